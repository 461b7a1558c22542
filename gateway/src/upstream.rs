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
//! task to copy it on.

use std::future::poll_fn;
use std::pin::Pin;
use std::sync::{Arc, Mutex, PoisonError};
use std::task::{Context, Poll, ready};

use bytes::Bytes;
use futures::FutureExt;
use h2::client::SendRequest;
use h2::{RecvStream, SendStream};
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{HeaderMap, Request, Response, Uri};
use http_body::Frame;
use http_body_util::BodyExt;
use madtech_common::tls::ClientTls;
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::body::Body;

/// The windows hyper's HTTP/2 client opens with (a tonic channel's
/// defaults), rather than the protocol's 64 KiB: a streamed export would
/// otherwise wait on window updates every few pages.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

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
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("the caller's request body failed: {0}")]
    RequestBody(tonic::Status),
}

/// Where an upstream is and how to reach it.
struct Target {
    scheme: Scheme,
    authority: Authority,
    /// `host:port` to connect to.
    address: String,
    tls: Option<(TlsConnector, ServerName<'static>)>,
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
    /// Held while connecting, so concurrent calls open one connection; it
    /// counts the connections opened.
    connecting: tokio::sync::Mutex<u64>,
}

impl Upstream {
    /// An upstream at `url` (`http://` or `https://`), not yet connected.
    pub fn new(tls: &ClientTls, url: &str) -> Result<Upstream, UpstreamError> {
        let invalid = |reason: &str| UpstreamError::Url {
            url: url.to_string(),
            reason: reason.to_string(),
        };
        let uri: Uri = url.parse().map_err(|_| invalid("not a URL"))?;
        let scheme = uri.scheme().cloned().ok_or_else(|| invalid("no scheme"))?;
        let authority = uri.authority().cloned().ok_or_else(|| invalid("no host"))?;
        let secure = scheme == Scheme::HTTPS;
        if !secure && scheme != Scheme::HTTP {
            return Err(invalid("the scheme must be http or https"));
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
                },
                current: Mutex::new(None),
                connecting: tokio::sync::Mutex::new(0),
            }),
        })
    }

    /// Forwards `request` as it is, path, metadata and deadline included,
    /// and answers the upstream's response as it streams in. An error means
    /// the call never reached the upstream or its connection failed before
    /// the response began.
    pub async fn call(&self, request: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let mut sender = self.ready_sender().await?;
        let (mut head, mut body) = request.into_parts();
        head.uri = self.inner.target.uri_for(&head.uri);
        let arrived = Arrived::take(&mut body).map_err(UpstreamError::RequestBody)?;
        let empty = arrived.complete && arrived.data.is_empty() && arrived.trailers.is_none();
        let (response, mut stream) = sender.send_request(Request::from_parts(head, ()), empty)?;
        if !empty {
            arrived.send(&mut stream)?;
            if !arrived.complete {
                tokio::spawn(copy_body(body, stream));
            }
        }
        let response = response.await?;
        Ok(response.map(|recv| Body::new(UpstreamBody::new(recv))))
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
        let sender = self.connect().await?;
        Ok(sender.ready().await?)
    }

    async fn connect(&self) -> Result<SendRequest<Bytes>, UpstreamError> {
        let mut opened = self.inner.connecting.lock().await;
        // Another call may have connected while this one waited.
        if let Some((_, sender)) = self.inner.open() {
            return Ok(sender);
        }
        *opened += 1;
        let number = *opened;
        let target = &self.inner.target;
        let tcp = TcpStream::connect(&target.address)
            .await
            .map_err(|source| UpstreamError::Connect {
                address: target.address.clone(),
                source,
            })?;
        // Small gRPC frames go out at once rather than waiting on the
        // previous segment's acknowledgement.
        let _ = tcp.set_nodelay(true);
        let sender = match &target.tls {
            None => self.handshake(tcp, number).await?,
            Some((connector, name)) => {
                let tls = connector
                    .connect(name.clone(), tcp)
                    .await
                    .map_err(|source| UpstreamError::Handshake {
                        address: target.address.clone(),
                        source,
                    })?;
                self.handshake(tls, number).await?
            }
        };
        *self
            .inner
            .current
            .lock()
            .unwrap_or_else(PoisonError::into_inner) = Some((number, sender.clone()));
        Ok(sender)
    }

    async fn handshake<T>(&self, io: T, number: u64) -> Result<SendRequest<Bytes>, UpstreamError>
    where
        T: AsyncRead + AsyncWrite + Unpin + Send + 'static,
    {
        let (sender, connection) = h2::client::Builder::new()
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false)
            .handshake(io)
            .await?;
        // The connection is driven on its own task; when it ends, the next
        // call opens another.
        let inner = Arc::downgrade(&self.inner);
        tokio::spawn(async move {
            if let Err(err) = connection.await {
                tracing::debug!(error = %err, "upstream connection ended");
            }
            if let Some(inner) = inner.upgrade() {
                inner.forget(number);
            }
        });
        Ok(sender)
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
}

/// The part of a request body that had arrived when the call began.
struct Arrived {
    data: Vec<Bytes>,
    trailers: Option<HeaderMap>,
    /// Whether that is the whole body.
    complete: bool,
}

impl Arrived {
    fn take(body: &mut Body) -> Result<Arrived, tonic::Status> {
        let mut arrived = Arrived {
            data: Vec::new(),
            trailers: None,
            complete: false,
        };
        while let Some(frame) = body.frame().now_or_never() {
            let Some(frame) = frame else {
                arrived.complete = true;
                break;
            };
            match frame?.into_data() {
                Ok(data) => arrived.data.push(data),
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
    /// The body was accepted under the gateway's message size limit, so it
    /// is sent without waiting for the upstream's window: h2 holds what the
    /// window does not yet admit.
    fn send(&self, stream: &mut SendStream<Bytes>) -> Result<(), h2::Error> {
        let last = self.data.len().saturating_sub(1);
        for (index, data) in self.data.iter().enumerate() {
            let end = self.complete && self.trailers.is_none() && index == last;
            stream.send_data(data.clone(), end)?;
        }
        match (&self.trailers, self.complete) {
            (Some(trailers), _) => stream.send_trailers(trailers.clone()),
            (None, true) if self.data.is_empty() => stream.send_data(Bytes::new(), true),
            _ => Ok(()),
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
                stream.send_reset(h2::Reason::CANCEL);
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
/// that carry the gRPC status.
struct UpstreamBody {
    recv: RecvStream,
    state: BodyState,
}

#[derive(PartialEq)]
enum BodyState {
    Data,
    Trailers,
    Done,
}

impl UpstreamBody {
    fn new(recv: RecvStream) -> Self {
        let state = if recv.is_end_stream() {
            BodyState::Done
        } else {
            BodyState::Data
        };
        UpstreamBody { recv, state }
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
                    this.state = BodyState::Done;
                    return Poll::Ready(Some(Err(err)));
                }
                None => this.state = BodyState::Trailers,
            }
        }
        if this.state == BodyState::Trailers {
            let trailers = ready!(this.recv.poll_trailers(cx));
            this.state = BodyState::Done;
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
            let body = request
                .into_body()
                .with_trailers(async move { Some(Ok(trailers)) });
            std::future::ready(Ok(Response::new(Body::new(body))))
        }
    }

    async fn serve_echo(listener: TcpListener) -> CancellationToken {
        let shutdown = CancellationToken::new();
        let server = madtech_common::server::GrpcServer::new()
            .without_reflection()
            .add_service(Echo);
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
        let mut request = Request::new(body);
        *request.uri_mut() = "http://gateway.example/test.Echo/Call"
            .parse()
            .expect("uri");
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
        for url in ["localhost:50051", "ftp://localhost:21", "not a url"] {
            assert!(
                matches!(
                    Upstream::new(&ClientTls::default(), url),
                    Err(UpstreamError::Url { .. })
                ),
                "{url}"
            );
        }
    }
}
