//! Pass-through calls to an upstream service: one multiplexed HTTP/2
//! connection per upstream, driven with `h2` directly, opened on first use
//! and again after it closes.
//!
//! Why not a tonic `Channel`, as the gateway's own clients use: a channel
//! hands every call to a buffer task, and hyper hands the request body to
//! a pipe task of its own, before HTTP/2 sees either. For a call the
//! gateway only forwards, those hops were a measurable share of its CPU
//! (docs/BENCHMARKS.md). Here the call's own task opens the stream and
//! writes the body that has already arrived, which for unary and
//! server-streaming calls is all of it; only a body still arriving gets a
//! task to copy it on. What hyper did besides is done here too: a call
//! dropped before it ends cancels its upstream stream, and the connection
//! is checked with pings so a vanished upstream fails calls rather than
//! holding them.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::atomic::{AtomicU64, Ordering};
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};
use std::time::Duration;

use bytes::Bytes;
use futures::FutureExt;
use h2::client::{Connection, SendRequest};
use h2::{Reason, RecvStream, SendStream};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use madtech_common::tls::ClientTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio::task::AbortHandle;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::Status;
use tonic::body::Body;
use tracing::Instrument;

/// The windows hyper's HTTP/2 client opens with (a tonic channel's
/// defaults), rather than the protocol's 64 KiB: a streamed export would
/// otherwise wait on window updates every few pages.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;
/// How much of a request body is written when the call begins without
/// waiting for the upstream's window; the rest is copied as the window
/// admits it.
const EAGER_BODY_BYTES: usize = 1024 * 1024;

/// How long connecting (TCP, TLS, the HTTP/2 preface) and keeping a
/// connection may take.
#[derive(Debug, Clone, Copy)]
struct Timing {
    connect: Duration,
    /// A ping after this long, and the connection is closed when its answer
    /// takes longer than `ping_timeout`.
    ping_interval: Duration,
    ping_timeout: Duration,
}

impl Default for Timing {
    fn default() -> Self {
        Timing {
            connect: Duration::from_secs(5),
            ping_interval: madtech_common::server::KEEPALIVE_INTERVAL,
            ping_timeout: Duration::from_secs(10),
        }
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] madtech_common::tls::TlsError),
    #[error("cannot connect to {address}: {source}")]
    Connect {
        address: String,
        source: std::io::Error,
    },
    #[error("TLS handshake with {address} failed: {source}")]
    Handshake {
        address: String,
        source: std::io::Error,
    },
    #[error("{address} did not agree to HTTP/2 over TLS (ALPN h2)")]
    NotHttp2 { address: String },
    #[error("connecting to {address} took longer than {timeout:?}")]
    ConnectTimedOut { address: String, timeout: Duration },
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("the caller's request body failed: {0}")]
    RequestBody(Status),
}

impl UpstreamError {
    /// What the caller of `service` hears. Only a failure that shows the
    /// upstream never took the call, or lost its connection, is
    /// `UNAVAILABLE` (which callers may retry); a stream the upstream reset
    /// is `INTERNAL`, since the call may have had its effect.
    pub fn status(&self, service: &str) -> Status {
        let unavailable = || Status::unavailable(format!("{service} is unavailable"));
        match self {
            UpstreamError::Http2(err) if !err.is_io() && !err.is_go_away() => match err.reason() {
                Some(Reason::REFUSED_STREAM) | None => unavailable(),
                Some(Reason::CANCEL) => Status::cancelled(format!("{service} cancelled the call")),
                Some(_) => Status::internal(format!("{service} reset the call")),
            },
            UpstreamError::RequestBody(status) => status.clone(),
            _ => unavailable(),
        }
    }
}

/// Where an upstream is and how to reach it.
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// `host:port` to connect to.
    address: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timing: Timing,
}

/// One upstream service's connection; clones share it.
#[derive(Clone)]
pub struct Upstream {
    inner: Arc<Inner>,
}

struct Inner {
    target: Target,
    /// The open connection's sender, with the number of the connection it
    /// belongs to, so a closed connection clears only itself.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Connection attempts so far; an attempt's number names its
    /// connection.
    attempts: AtomicU64,
    /// Held while connecting, so concurrent calls open one connection; it
    /// keeps the last attempt's failure, which the calls that waited on that
    /// attempt share instead of each trying again in turn.
    connecting: tokio::sync::Mutex<Option<String>>,
}

impl Upstream {
    /// An upstream at `url` (`http://` or `https://`), not yet connected.
    pub fn new(tls: &ClientTls, url: &str) -> Result<Upstream, UpstreamError> {
        Upstream::with_timing(tls, url, Timing::default())
    }

    fn with_timing(tls: &ClientTls, url: &str, timing: Timing) -> Result<Upstream, UpstreamError> {
        let invalid = |reason: &str| UpstreamError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        if authority.as_str().contains('@') {
            return Err(invalid("user information is not sent to an upstream"));
        }
        let secure = scheme == Scheme::HTTPS;
        if !secure && scheme != Scheme::HTTP {
            return Err(invalid("the scheme must be http or https"));
        }
        if secure && tls.ca_file.is_none() {
            return Err(invalid(
                "https needs the CA that signed the upstream's certificate (upstream_tls.ca_file)",
            ));
        }
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        let host = authority.host();
        let tls = if secure {
            let config = tls.rustls_client_config(&["h2"])?;
            let name = tls.domain.clone().unwrap_or_else(|| {
                // A bracketed IPv6 literal is named without its brackets.
                host.trim_start_matches('[')
                    .trim_end_matches(']')
                    .to_string()
            });
            let name = ServerName::try_from(name).map_err(|_| invalid("not a TLS server name"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Upstream {
            inner: Arc::new(Inner {
                target: Target {
                    scheme,
                    address: format!("{host}:{port}"),
                    authority,
                    tls,
                    timing,
                },
                current: Mutex::new(None),
                attempts: AtomicU64::new(0),
                connecting: tokio::sync::Mutex::new(None),
            }),
        })
    }

    /// Forwards `request` as it is, path, metadata and deadline included,
    /// and answers the upstream's response as it streams in. An error means
    /// the response never began: the call did not reach the upstream, its
    /// connection failed, or the upstream reset the stream (see
    /// [`UpstreamError::status`]).
    pub async fn call(&self, request: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let (mut head, mut body) = request.into_parts();
        head.uri = self.inner.target.uri_for(&head.uri);
        // HTTP/2 names the origin in `:authority` alone (RFC 9113, 8.3.1).
        head.headers.remove(http::header::HOST);
        let arrived = Arrived::take(&mut body).map_err(UpstreamError::RequestBody)?;
        let empty = arrived.complete && arrived.data.is_empty() && arrived.trailers.is_none();
        let mut sender = self.ready_sender().await?;
        let (response, mut stream) = sender.send_request(Request::from_parts(head, ()), empty)?;
        let mut copying = CancelOnDrop(None);
        if !empty {
            let complete = arrived.complete;
            arrived.send(&mut stream)?;
            if !complete {
                let task = tokio::spawn(copy_body(body, stream).in_current_span());
                copying = CancelOnDrop(Some(task.abort_handle()));
            }
        }
        // Dropped before the response (the caller gone, the gateway's
        // timeout), `copying` stops the copy, and with its last handle on
        // the stream gone h2 resets it: the upstream stops working for no
        // one, and its answer does not sit in the connection's window.
        let response = response.await?;
        Ok(response.map(|recv| Body::new(UpstreamBody::new(recv, copying))))
    }

    /// A sender ready for one more stream: the open connection's, or a new
    /// connection's when there is none or it has closed.
    async fn ready_sender(&self) -> Result<SendRequest<Bytes>, UpstreamError> {
        if let Some((number, sender)) = self.inner.open() {
            match sender.ready().await {
                Ok(sender) => return Ok(sender),
                Err(err) => {
                    tracing::debug!(error = %err, "upstream connection closed; reconnecting");
                    self.inner.forget(number);
                }
            }
        }
        let (number, sender) = self.connect().await?;
        sender.ready().await.map_err(|err| {
            self.inner.forget(number);
            err.into()
        })
    }

    async fn connect(&self) -> Result<(u64, SendRequest<Bytes>), UpstreamError> {
        let attempts_seen = self.inner.attempts.load(Ordering::Acquire);
        let mut last_failure = self.inner.connecting.lock().await;
        // Another call may have connected, or failed to, while this one
        // waited.
        if let Some(open) = self.inner.open() {
            return Ok(open);
        }
        if self.inner.attempts.load(Ordering::Acquire) != attempts_seen
            && let Some(failure) = last_failure.as_ref()
        {
            return Err(UpstreamError::Connect {
                address: self.inner.target.address.clone(),
                source: std::io::Error::other(failure.clone()),
            });
        }
        // Counted when it ends, so every call that waited on it shares
        // its outcome.
        let number = self.inner.attempts.load(Ordering::Acquire) + 1;
        let timing = self.inner.target.timing;
        let opened = tokio::time::timeout(timing.connect, self.inner.target.open())
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::ConnectTimedOut {
                    address: self.inner.target.address.clone(),
                    timeout: timing.connect,
                })
            });
        self.inner.attempts.store(number, Ordering::Release);
        let (sender, connection) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                *last_failure = Some(err.to_string());
                return Err(err);
            }
        };
        *last_failure = None;
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((number, sender.clone()));
        tokio::spawn(drive(
            connection,
            Arc::downgrade(&self.inner),
            number,
            timing,
        ));
        Ok((number, sender))
    }
}

/// Drives a connection, pinging it while it is idle or busy alike, until it
/// ends or a ping goes unanswered; then the next call opens another.
async fn drive(
    mut connection: Connection<BoxedIo, Bytes>,
    inner: std::sync::Weak<Inner>,
    number: u64,
    timing: Timing,
) {
    let ping_pong = connection.ping_pong();
    let keepalive = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(timing.ping_interval).await;
            let answered =
                tokio::time::timeout(timing.ping_timeout, ping_pong.ping(h2::Ping::opaque())).await;
            if !matches!(answered, Ok(Ok(_))) {
                return;
            }
        }
    };
    tokio::select! {
        ended = &mut connection => {
            if let Err(err) = ended {
                tracing::debug!(error = %err, "upstream connection ended");
            }
        }
        () = keepalive => {
            tracing::warn!("an upstream did not answer a ping in time; closing its connection");
        }
    }
    // Dropping the connection fails the calls still on it.
    drop(connection);
    if let Some(inner) = inner.upgrade() {
        inner.forget(number);
    }
}

impl Inner {
    fn open(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    fn forget(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(open, _)| *open == number) {
            *current = None;
        }
    }
}

impl Target {
    /// The caller's path on the upstream's origin.
    fn uri_for(&self, uri: &Uri) -> Uri {
        let mut parts = http::uri::Parts::default();
        parts.scheme = Some(self.scheme.clone());
        parts.authority = Some(self.authority.clone());
        parts.path_and_query = Some(
            uri.path_and_query()
                .cloned()
                .unwrap_or_else(|| PathAndQuery::from_static("/")),
        );
        Uri::from_parts(parts).unwrap_or_else(|_| uri.clone())
    }

    /// A new HTTP/2 connection, plain or TLS.
    async fn open(
        &self,
    ) -> Result<(SendRequest<Bytes>, Connection<BoxedIo, Bytes>), UpstreamError> {
        let tcp =
            TcpStream::connect(&self.address)
                .await
                .map_err(|source| UpstreamError::Connect {
                    address: self.address.clone(),
                    source,
                })?;
        // Small gRPC frames go out at once rather than waiting on the
        // previous segment's acknowledgement.
        let _ = tcp.set_nodelay(true);
        let io: BoxedIo = match &self.tls {
            None => Box::new(tcp),
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| UpstreamError::Handshake {
                        address: self.address.clone(),
                        source,
                    })?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(UpstreamError::NotHttp2 {
                        address: self.address.clone(),
                    });
                }
                Box::new(tls)
            }
        };
        Ok(h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake(io)
            .await?)
    }
}

/// A connection's transport, plain or TLS: one type, so one connection
/// driver.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxedIo = Box<dyn Io>;

/// Stops a request body's copying task when dropped while armed.
struct CancelOnDrop(Option<AbortHandle>);

impl CancelOnDrop {
    fn disarm(&mut self) {
        self.0 = None;
    }
}

impl Drop for CancelOnDrop {
    fn drop(&mut self) {
        if let Some(task) = self.0.take() {
            task.abort();
        }
    }
}

/// The part of a request body that had arrived when the call began (at
/// most [`EAGER_BODY_BYTES`] of it).
struct Arrived {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    /// Whether that is the whole body.
    complete: bool,
}

impl Arrived {
    fn take(body: &mut Body) -> Result<Arrived, Status> {
        let mut arrived = Arrived {
            data: Vec::new(),
            trailers: None,
            complete: false,
        };
        let mut taken = 0;
        while taken < EAGER_BODY_BYTES {
            let Some(frame) = body.frame().now_or_never() else {
                break;
            };
            let Some(frame) = frame else {
                arrived.complete = true;
                break;
            };
            match frame?.into_data() {
                Ok(data) => {
                    taken += data.len();
                    arrived.data.push(data);
                }
                Err(frame) => {
                    arrived.trailers = frame.into_trailers().ok();
                    arrived.complete = true;
                    break;
                }
            }
        }
        Ok(arrived)
    }

    /// Writes what arrived, ending the stream when it is the whole body.
    /// It is bounded by [`EAGER_BODY_BYTES`], so it is sent without waiting
    /// for the upstream's window: h2 holds what the window does not yet
    /// admit.
    /// (A complete body with nothing in it never comes here: its stream
    /// ends with the request's headers.)
    fn send(self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        let last = self.data.len().saturating_sub(1);
        let ends_with_data = self.complete && self.trailers.is_none();
        for (index, data) in self.data.into_iter().enumerate() {
            stream.send_data(data, ends_with_data && index == last)?;
        }
        match self.trailers {
            Some(trailers) => stream.send_trailers(trailers),
            None => Ok(()),
        }
    }
}

/// Copies the rest of a streaming request body upstream, as fast as the
/// upstream's window admits it, until the body ends or either side stops.
async fn copy_body(mut body: Body, mut stream: SendStream<Bytes>) {
    loop {
        let frame = tokio::select! {
            frame = body.frame() => frame,
            _ = poll_fn(|cx| stream.poll_reset(cx)) => return,
        };
        let sent = match frame {
            None => {
                let _ = stream.send_data(Bytes::new(), true);
                return;
            }
            Some(Ok(frame)) => match frame.into_data() {
                Ok(data) => send_within_window(&mut stream, data).await,
                Err(frame) => {
                    if let Ok(trailers) = frame.into_trailers() {
                        let _ = stream.send_trailers(trailers);
                        return;
                    }
                    Ok(())
                }
            },
            Some(Err(_)) => {
                stream.send_reset(Reason::CANCEL);
                return;
            }
        };
        if sent.is_err() {
            return;
        }
    }
}

async fn send_within_window(
    stream: &mut SendStream<Bytes>,
    mut data: Bytes,
) -> Result<(), h2::Error> {
    while !data.is_empty() {
        stream.reserve_capacity(data.len());
        let granted = match poll_fn(|cx| stream.poll_capacity(cx)).await {
            Some(granted) => granted?,
            // The stream is closed; there is nowhere to send.
            None => return Ok(()),
        };
        if granted > 0 {
            stream.send_data(data.split_to(granted.min(data.len())), false)?;
        }
    }
    Ok(())
}

/// An upstream response body as the gateway's server sends it on: data as
/// it arrives (its window released as it is passed on, so a slow caller
/// slows the upstream rather than filling the gateway), then the trailers
/// that carry the gRPC status. Dropped before its end (the caller gone), it
/// stops the request body's copy too.
struct UpstreamBody {
    recv: RecvStream,
    state: BodyState,
    copying: CancelOnDrop,
}

#[derive(PartialEq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl UpstreamBody {
    fn new(recv: RecvStream, mut copying: CancelOnDrop) -> Self {
        let state = if recv.is_end_stream() {
            copying.disarm();
            BodyState::Done
        } else {
            BodyState::Data
        };
        UpstreamBody {
            recv,
            state,
            copying,
        }
    }

    fn finish(&mut self) {
        self.state = BodyState::Done;
        self.copying.disarm();
    }
}

impl http_body::Body for UpstreamBody {
    type Data = Bytes;
    type Error = h2::Error;

    fn poll_frame(
        mut self: Pin<&mut Self>,
        cx: &mut Context<'_>,
    ) -> Poll<Option<Result<Frame<Bytes>, h2::Error>>> {
        let this = &mut *self;
        if this.state == BodyState::Data {
            match ready!(this.recv.poll_data(cx)) {
                Some(Ok(data)) => {
                    let _ = this.recv.flow_control().release_capacity(data.len());
                    return Poll::Ready(Some(Ok(Frame::data(data))));
                }
                Some(Err(err)) => {
                    this.finish();
                    return Poll::Ready(Some(Err(err)));
                }
                None => this.state = BodyState::Trailers,
            }
        }
        if this.state == BodyState::Trailers {
            let trailers = ready!(this.recv.poll_trailers(cx));
            this.finish();
            return Poll::Ready(trailers.map(|t| t.map(Frame::trailers)).transpose());
        }
        Poll::Ready(None)
    }

    fn is_end_stream(&self) -> bool {
        self.state == BodyState::Done
    }
}

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http::HeaderValue;
    use http_body_util::StreamBody;
    use madtech_common::CancellationToken;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::server::NamedService;

    use super::*;

    /// An upstream that answers any call with the request's body, frame
    /// by frame as it arrives, then trailers naming the path and authority
    /// it saw and echoing the caller's `x-probe` metadata.
    #[derive(Clone)]
    struct Echo;

    impl NamedService for Echo {
        const NAME: &'static str = "test.Echo";
    }

    impl tower::Service<Request<Body>> for Echo {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = std::future::Ready<Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let seen = format!("{} {:?}", request.uri().path(), request.uri().authority());
            trailers.insert("x-seen", HeaderValue::from_str(&seen).expect("header"));
            if let Some(probe) = request.headers().get("x-probe") {
                trailers.insert("x-probe", probe.clone());
            }
            if let Some(host) = request.headers().get(http::header::HOST) {
                trailers.insert("x-host", host.clone());
            }
            let body = request
                .into_body()
                .with_trailers(async move { Some(Ok(trailers)) });
            std::future::ready(Ok(Response::new(Body::new(body))))
        }
    }

    /// An upstream that reads a call's whole request body and tells the
    /// test whether it ended well or was reset. `/test.Drain/Late` answers
    /// once the body has ended; `/test.Drain/Early` answers at once with a
    /// response that stays open.
    #[derive(Clone)]
    struct Drain(mpsc::UnboundedSender<bool>);

    impl NamedService for Drain {
        const NAME: &'static str = "test.Drain";
    }

    impl tower::Service<Request<Body>> for Drain {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = futures::future::BoxFuture<'static, Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let report = self.0.clone();
            let early = request.uri().path().ends_with("/Early");
            let drained = async move {
                let ended_well = request.into_body().collect().await.is_ok();
                let _ = report.send(ended_well);
            };
            Box::pin(async move {
                if early {
                    tokio::spawn(drained);
                    let open = futures::stream::pending::<Result<Frame<Bytes>, Status>>();
                    Ok(Response::new(Body::new(StreamBody::new(open))))
                } else {
                    drained.await;
                    Ok(Response::new(Body::empty()))
                }
            })
        }
    }

    async fn serve_echo(listener: TcpListener) -> CancellationToken {
        serve(listener, mpsc::unbounded_channel().0).await
    }

    async fn serve(
        listener: TcpListener,
        drained: mpsc::UnboundedSender<bool>,
    ) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let server = madtech_common::server::GrpcServer::new()
            .without_reflection()
            .add_service(Echo)
            .add_service(Drain(drained));
        tokio::spawn(server.serve(listener, shutdown.clone()));
        shutdown
    }

    async fn echo_upstream() -> (Upstream, SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = serve_echo(listener).await;
        let upstream =
            Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream");
        (upstream, addr, shutdown)
    }

    fn request(body: Body) -> Request<Body> {
        request_to("/test.Echo/Call", body)
    }

    fn request_to(path: &str, body: Body) -> Request<Body> {
        let mut request = Request::new(body);
        *request.uri_mut() = format!("http://gateway.example{path}")
            .parse()
            .expect("uri");
        request.headers_mut().insert(
            http::header::HOST,
            HeaderValue::from_static("gateway.example"),
        );
        request
            .headers_mut()
            .insert("x-probe", HeaderValue::from_static("kept"));
        request
    }

    /// Data and trailers of a response body.
    async fn read_all(body: Body) -> (Vec<u8>, HeaderMap) {
        let collected = body.collect().await.expect("body");
        let trailers = collected.trailers().cloned().unwrap_or_default();
        (collected.to_bytes().to_vec(), trailers)
    }

    #[tokio::test]
    async fn a_body_that_has_arrived_is_forwarded_with_path_metadata_and_trailers() {
        let (upstream, addr, _shutdown) = echo_upstream().await;
        let response = upstream
            .call(request(Body::new(http_body_util::Full::new(
                Bytes::from_static(b"\0\0\0\0\x03abc"),
            ))))
            .await
            .expect("call");
        let (data, trailers) = read_all(response.into_body()).await;
        assert_eq!(data, b"\0\0\0\0\x03abc");
        assert_eq!(trailers["grpc-status"], "0");
        assert_eq!(trailers["x-probe"], "kept");
        assert!(
            !trailers.contains_key("x-host"),
            "the caller's host header is not sent"
        );
        assert_eq!(
            trailers["x-seen"],
            format!("/test.Echo/Call Some({addr})").as_str(),
            "the path is the caller's, the authority the upstream's"
        );
    }

    #[tokio::test]
    async fn an_empty_body_ends_the_stream_with_its_headers() {
        let (upstream, _addr, _shutdown) = echo_upstream().await;
        let response = upstream.call(request(Body::empty())).await.expect("call");
        let (data, trailers) = read_all(response.into_body()).await;
        assert!(data.is_empty());
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_body_still_arriving_streams_both_ways() {
        let (upstream, _addr, _shutdown) = echo_upstream().await;
        let (frames, receiver) = mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(1);
        let body = Body::new(StreamBody::new(ReceiverStream::new(receiver)));
        let response = upstream.call(request(body)).await.expect("call");
        let mut echoed = response.into_body();
        // Each message comes back before the next is sent: the request
        // body is copied while the response streams.
        for message in [&b"first"[..], b"second", b"third"] {
            frames
                .send(Ok(Frame::data(Bytes::from_static(message))))
                .await
                .expect("send");
            let frame = echoed.frame().await.expect("a frame").expect("data");
            assert_eq!(frame.into_data().expect("data"), message);
        }
        drop(frames);
        let (rest, trailers) = read_all(echoed).await;
        assert!(rest.is_empty());
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn a_large_streamed_body_is_copied_within_the_upstreams_window() {
        let (upstream, _addr, _shutdown) = echo_upstream().await;
        // Four times the upstream's default stream window, in pieces.
        let piece = Bytes::from(vec![7u8; 256 * 1024]);
        let (frames, receiver) = mpsc::channel::<Result<Frame<Bytes>, tonic::Status>>(1);
        let body = Body::new(StreamBody::new(ReceiverStream::new(receiver)));
        let sending = tokio::spawn({
            let piece = piece.clone();
            async move {
                for _ in 0..16 {
                    frames
                        .send(Ok(Frame::data(piece.clone())))
                        .await
                        .expect("send");
                }
            }
        });
        let response = upstream.call(request(body)).await.expect("call");
        let (data, trailers) = read_all(response.into_body()).await;
        sending.await.expect("sent");
        assert_eq!(data.len(), 16 * piece.len());
        assert!(data.iter().all(|byte| *byte == 7));
        assert_eq!(trailers["grpc-status"], "0");
    }

    #[tokio::test]
    async fn an_upstream_that_is_down_fails_the_call_and_one_that_returns_is_reconnected() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        drop(listener);
        let upstream =
            Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream");
        let down = upstream.call(request(Body::empty())).await;
        assert!(
            matches!(down, Err(UpstreamError::Connect { .. })),
            "{down:?}"
        );

        for _restart in 0..2 {
            let listener = TcpListener::bind(addr).await.expect("rebind");
            let shutdown = serve_echo(listener).await;
            let response = upstream
                .call(request(Body::empty()))
                .await
                .expect("reconnected");
            let (_, trailers) = read_all(response.into_body()).await;
            assert_eq!(trailers["grpc-status"], "0");
            // The upstream stops (closing its connection) and comes back.
            shutdown.cancel();
            tokio::time::sleep(std::time::Duration::from_millis(200)).await;
        }
    }

    #[test]
    fn upstream_urls_are_checked() {
        for url in [
            "localhost:50051",
            "ftp://localhost:21",
            "not a url",
            "http://user:secret@localhost:50051",
            "https://localhost:50051",
        ] {
            assert!(
                matches!(
                    Upstream::new(&ClientTls::default(), url),
                    Err(UpstreamError::Url { .. })
                ),
                "{url}"
            );
        }
    }

    /// A streaming body whose sender the test keeps: it never ends.
    fn endless_body() -> (mpsc::Sender<Result<Frame<Bytes>, Status>>, Body) {
        let (frames, receiver) = mpsc::channel(4);
        (
            frames,
            Body::new(StreamBody::new(ReceiverStream::new(receiver))),
        )
    }

    async fn drain_upstream() -> (Upstream, mpsc::UnboundedReceiver<bool>, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (drained, reports) = mpsc::unbounded_channel();
        let shutdown = serve(listener, drained).await;
        let upstream =
            Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream");
        (upstream, reports, shutdown)
    }

    async fn next_report(reports: &mut mpsc::UnboundedReceiver<bool>) -> Option<bool> {
        tokio::time::timeout(std::time::Duration::from_secs(5), reports.recv())
            .await
            .ok()
            .flatten()
    }

    #[tokio::test]
    async fn a_call_dropped_before_its_answer_resets_the_upstream_stream() {
        let (upstream, mut reports, _shutdown) = drain_upstream().await;
        let (frames, body) = endless_body();
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("send");
        let calling = tokio::spawn({
            let upstream = upstream.clone();
            async move { upstream.call(request_to("/test.Drain/Late", body)).await }
        });
        tokio::time::sleep(std::time::Duration::from_millis(100)).await;
        // As the gateway's timeout drops a call whose answer is late.
        calling.abort();
        assert_eq!(
            next_report(&mut reports).await,
            Some(false),
            "the upstream sees its request reset while the caller still holds the body open"
        );
        drop(frames);
    }

    #[tokio::test]
    async fn a_response_dropped_before_its_end_resets_the_upstream_stream() {
        let (upstream, mut reports, _shutdown) = drain_upstream().await;
        let (frames, body) = endless_body();
        let response = upstream
            .call(request_to("/test.Drain/Early", body))
            .await
            .expect("answered");
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"part"))))
            .await
            .expect("send");
        // The caller goes away.
        drop(response);
        assert_eq!(next_report(&mut reports).await, Some(false));
        drop(frames);
    }

    #[tokio::test]
    async fn an_upstream_that_stops_answering_fails_its_calls_by_the_pings() {
        // Connections are accepted (by the kernel) and never answered.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let timing = Timing {
            connect: std::time::Duration::from_secs(5),
            ping_interval: std::time::Duration::from_millis(100),
            ping_timeout: std::time::Duration::from_millis(200),
        };
        let upstream =
            Upstream::with_timing(&ClientTls::default(), &format!("http://{addr}"), timing)
                .expect("upstream");
        let failed = tokio::time::timeout(
            std::time::Duration::from_secs(5),
            upstream.call(request(Body::empty())),
        )
        .await
        .expect("the unanswered ping ends the call");
        let err = failed.expect_err("no answer");
        assert!(matches!(err, UpstreamError::Http2(_)), "{err:?}");
        assert_eq!(err.status("test.Echo").code(), tonic::Code::Unavailable);
        drop(silent);
    }

    #[test]
    fn only_failures_before_the_upstream_took_the_call_are_unavailable() {
        let reset = |reason| {
            UpstreamError::Http2(h2::Error::from(reason))
                .status("s")
                .code()
        };
        assert_eq!(reset(Reason::REFUSED_STREAM), tonic::Code::Unavailable);
        assert_eq!(reset(Reason::CANCEL), tonic::Code::Cancelled);
        assert_eq!(reset(Reason::INTERNAL_ERROR), tonic::Code::Internal);
        let refused = UpstreamError::Connect {
            address: "profiles:50052".into(),
            source: std::io::ErrorKind::ConnectionRefused.into(),
        };
        assert_eq!(refused.status("s").code(), tonic::Code::Unavailable);
        let oversized = UpstreamError::RequestBody(Status::resource_exhausted("too large"));
        assert_eq!(oversized.status("s").code(), tonic::Code::ResourceExhausted);
    }

    #[tokio::test]
    async fn calls_waiting_on_a_connection_attempt_share_its_failure() {
        // A TLS upstream that accepts connections and never answers the
        // handshake: each attempt takes the whole connect timeout.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let (accepted_tx, mut accepted) = mpsc::unbounded_channel();
        tokio::spawn(async move {
            let mut held = Vec::new();
            while let Ok((socket, _)) = silent.accept().await {
                held.push(socket);
                let _ = accepted_tx.send(());
            }
        });
        let dir = tempfile::tempdir().expect("dir");
        let ca_key = rcgen::KeyPair::generate().expect("key");
        let ca = rcgen::CertificateParams::new(vec!["localhost".to_string()])
            .expect("params")
            .self_signed(&ca_key)
            .expect("ca");
        let ca_file = dir.path().join("ca.pem");
        std::fs::write(&ca_file, ca.pem()).expect("write");
        let tls = ClientTls {
            ca_file: Some(ca_file),
            ..ClientTls::default()
        };
        let timing = Timing {
            connect: std::time::Duration::from_millis(300),
            ..Timing::default()
        };
        let upstream =
            Upstream::with_timing(&tls, &format!("https://localhost:{}", addr.port()), timing)
                .expect("upstream");

        let calls = (0..3).map(|_| upstream.call(request(Body::empty())));
        for failed in futures::future::join_all(calls).await {
            let err = failed.expect_err("no handshake");
            assert_eq!(
                err.status("test.Echo").code(),
                tonic::Code::Unavailable,
                "{err:?}"
            );
        }
        let mut connections = 0;
        while accepted.try_recv().is_ok() {
            connections += 1;
        }
        assert_eq!(
            connections, 1,
            "one attempt for the three calls that waited on it"
        );
    }
}
