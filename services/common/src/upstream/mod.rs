//! Calls to another component: an HTTP/2 connection to each address the
//! component's name resolves to, driven with `h2` directly, and each call
//! on the less busy of two of them.
//!
//! Two kinds of caller use it. The gateway forwards calls through
//! [`Upstream::call`] without decoding them; every component's tonic
//! clients use an [`Upstream`] as their transport
//! (`ProfileServiceClient::new(upstream)`), so that a component with
//! several pods behind a headless Service gets calls on all of them.
//!
//! Why not a tonic `Channel`: a channel connects to one address its name
//! resolves to and keeps it, so every call a client makes goes to one pod,
//! and its balancing alternative holds calls while it has no endpoints
//! and evicts a failed one for good. A channel also hands every call to a
//! buffer task, and hyper hands the request body to a pipe task of its
//! own, before HTTP/2 sees either; for a call the gateway only forwards,
//! those hops were a measurable share of its CPU (docs/BENCHMARKS.md).
//! Here the call's own task opens the stream and writes the body that has
//! already arrived, which for unary and server-streaming calls is all of
//! it; only a body still arriving gets a task to copy it on. What hyper
//! did besides is done here too: a call dropped before it ends cancels its
//! upstream stream, and the connection is checked with pings so a vanished
//! upstream fails calls rather than holding them.

mod addresses;
mod body;
mod connection;

use std::sync::Arc;
use std::task::{Context, Poll};
use std::time::Duration;

use crate::tls::ClientTls;
use bytes::Bytes;
use futures::future::BoxFuture;
use h2::Reason;
use http::uri::{Authority, PathAndQuery, Scheme};
use http::{Request, Response, Uri};
use tokio_rustls::TlsConnector;
use tokio_rustls::rustls::pki_types::ServerName;
use tonic::body::Body;
use tonic::{Code, Status};
use tracing::Instrument;

use self::addresses::{Addresses, choose, instead_of};
pub(crate) use self::addresses::{Resolve, SystemResolver};
use self::body::{Arrived, CancelOnDrop, UpstreamBody, copy_body};
use self::connection::{Endpoint, Load};

/// How long connecting (TCP, TLS, the HTTP/2 preface), resolving a name
/// and keeping a connection may take, and how often a name is resolved
/// again.
#[derive(Debug, Clone, Copy)]
pub(crate) struct Timing {
    connect: Duration,
    /// A ping after this long, and the connection is closed when its answer
    /// takes longer than `ping_timeout`.
    ping_interval: Duration,
    ping_timeout: Duration,
    /// How often an upstream's name is resolved again, to follow its
    /// pods.
    resolve_interval: Duration,
    /// How long after its first failed attempt an address that could not
    /// be reached is tried again (in the background; meanwhile it is
    /// passed over, and calls that still come to it hear its failure at
    /// once). Each failure in a row doubles it, up to `backoff_longest`,
    /// which bounds how long an address that answers again (a restarted
    /// container keeps its pod's address) waits to be used.
    backoff_first: Duration,
    backoff_longest: Duration,
    /// The id of a connection's first stream; tests start near the last
    /// one (2^31 - 1) to see a connection run out.
    #[cfg(test)]
    first_stream_id: u32,
}

impl Timing {
    /// The defaults, resolving names every `resolve_interval`.
    pub(crate) fn resolving_every(resolve_interval: Duration) -> Timing {
        Timing {
            connect: Duration::from_secs(5),
            ping_interval: crate::server::KEEPALIVE_INTERVAL,
            ping_timeout: Duration::from_secs(10),
            resolve_interval,
            backoff_first: Duration::from_secs(1),
            backoff_longest: Duration::from_secs(10),
            #[cfg(test)]
            first_stream_id: 1,
        }
    }

    /// How long an address is backed off after `failures` failed attempts
    /// in a row (at least one).
    fn backoff(&self, failures: u32) -> Duration {
        crate::changelog::doubling(
            self.backoff_first,
            failures.saturating_sub(1),
            self.backoff_longest,
        )
    }
}

/// How often a name is resolved again unless configured otherwise: pods
/// that come and go are followed within seconds, and a lookup every five
/// seconds costs the cluster DNS nothing.
pub const DEFAULT_RESOLVE_INTERVAL: Duration = Duration::from_secs(5);

impl Default for Timing {
    fn default() -> Self {
        Timing::resolving_every(DEFAULT_RESOLVE_INTERVAL)
    }
}

#[derive(Debug, thiserror::Error)]
pub enum UpstreamError {
    #[error("invalid upstream URL {url}: {reason}")]
    Url { url: String, reason: String },
    #[error("TLS configuration: {0}")]
    Tls(#[from] crate::tls::TlsError),
    #[error("cannot resolve {host}: {reason}")]
    Resolve { host: String, reason: String },
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
    #[error("HTTP/2 handshake with {address} failed: {source}")]
    Http2Handshake { address: String, source: h2::Error },
    #[error("connecting to {address} took longer than {timeout:?}")]
    ConnectTimedOut { address: String, timeout: Duration },
    #[error("HTTP/2: {0}")]
    Http2(#[from] h2::Error),
    #[error("the caller's request body failed: {0}")]
    RequestBody(Status),
    /// One attempt's failure, heard by every call that waited on that
    /// attempt or came while its address was failing.
    #[error(transparent)]
    Shared(Arc<UpstreamError>),
}

impl UpstreamError {
    /// The code a caller hears. Only a failure that shows the upstream
    /// never took the call, or lost its connection, is `UNAVAILABLE` (which
    /// callers may retry); a stream the upstream reset is `INTERNAL`, since
    /// the call may have had its effect.
    pub fn code(&self) -> Code {
        match self {
            UpstreamError::Http2(err) if !err.is_io() && !err.is_go_away() => match err.reason() {
                Some(Reason::REFUSED_STREAM) | None => Code::Unavailable,
                Some(Reason::CANCEL) => Code::Cancelled,
                Some(_) => Code::Internal,
            },
            UpstreamError::RequestBody(status) => status.code(),
            UpstreamError::Shared(failure) => failure.code(),
            _ => Code::Unavailable,
        }
    }

    /// What a caller outside the suite hears of `service`: the code, and
    /// nothing of addresses or reasons.
    pub fn status(&self, service: &str) -> Status {
        if let UpstreamError::RequestBody(status) = self {
            return status.clone();
        }
        let code = self.code();
        let message = match code {
            Code::Cancelled => format!("{service} cancelled the call"),
            Code::Internal => format!("{service} reset the call"),
            _ => format!("{service} is unavailable"),
        };
        Status::new(code, message)
    }

    /// The failure itself, whether this call's attempt or one it shared.
    pub fn underlying(&self) -> &UpstreamError {
        match self {
            UpstreamError::Shared(failure) => failure.underlying(),
            failure => failure,
        }
    }

    /// Whether the failure was reaching the address at all, so the call was
    /// never sent and may go to another.
    fn is_connecting(&self) -> bool {
        match self {
            UpstreamError::Connect { .. }
            | UpstreamError::Handshake { .. }
            | UpstreamError::NotHttp2 { .. }
            | UpstreamError::Http2Handshake { .. }
            | UpstreamError::ConnectTimedOut { .. } => true,
            UpstreamError::Shared(failure) => failure.is_connecting(),
            _ => false,
        }
    }
}

/// Milliseconds on a clock shared by an upstream's parts, for deadlines
/// kept in atomics.
fn now_millis() -> u64 {
    static EPOCH: std::sync::LazyLock<std::time::Instant> =
        std::sync::LazyLock::new(std::time::Instant::now);
    u64::try_from(EPOCH.elapsed().as_millis()).unwrap_or(u64::MAX)
}

/// What every address of an upstream shares: the origin calls are made
/// to, and how to reach it.
struct Origin {
    scheme: Scheme,
    authority: Authority,
    /// The name certificates are checked against, under TLS.
    tls: Option<(TlsConnector, ServerName<'static>)>,
    timing: Timing,
}

/// One upstream service: its addresses and their connections; clones
/// share them.
#[derive(Clone)]
pub struct Upstream {
    origin: Arc<Origin>,
    addresses: Arc<Addresses>,
}

impl Upstream {
    /// An upstream at `url` (`http://` or `https://`), not yet resolved or
    /// connected; a name is resolved with the system's resolver every
    /// [`DEFAULT_RESOLVE_INTERVAL`].
    pub fn new(tls: &ClientTls, url: &str) -> Result<Upstream, UpstreamError> {
        Upstream::resolving_every(tls, url, DEFAULT_RESOLVE_INTERVAL)
    }

    /// As [`Upstream::new`], resolving a name every `resolve_interval`.
    pub fn resolving_every(
        tls: &ClientTls,
        url: &str,
        resolve_interval: Duration,
    ) -> Result<Upstream, UpstreamError> {
        Upstream::with(
            tls,
            url,
            Timing::resolving_every(resolve_interval),
            Arc::new(SystemResolver),
        )
    }

    fn with(
        tls: &ClientTls,
        url: &str,
        timing: Timing,
        resolver: Arc<dyn Resolve>,
    ) -> Result<Upstream, UpstreamError> {
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
                "https needs the CA that signed the upstream's certificate (ca_file)",
            ));
        }
        let port = authority
            .port_u16()
            .unwrap_or(if secure { 443 } else { 80 });
        // A bracketed IPv6 literal is named without its brackets.
        let host = authority
            .host()
            .trim_start_matches('[')
            .trim_end_matches(']')
            .to_string();
        let tls = if secure {
            let config = tls.rustls_client_config(&["h2"])?;
            let name = tls.domain.clone().unwrap_or_else(|| host.clone());
            let name = ServerName::try_from(name).map_err(|_| invalid("not a TLS server name"))?;
            Some((TlsConnector::from(config), name))
        } else {
            None
        };
        Ok(Upstream {
            addresses: Arc::new(Addresses::new(
                &host,
                port,
                resolver,
                timing.resolve_interval,
                timing.connect,
            )),
            origin: Arc::new(Origin {
                scheme,
                authority,
                tls,
                timing,
            }),
        })
    }

    /// Forwards `request` as it is, path, metadata and deadline included,
    /// and answers the upstream's response as it streams in. An error means
    /// the response never began: the call did not reach the upstream, its
    /// connection failed, or the upstream reset the stream (see
    /// [`UpstreamError::status`]).
    ///
    /// A whole request the upstream shows it never processed — its stream
    /// refused (`REFUSED_STREAM`), or above the last one a graceful
    /// `GOAWAY` kept, as when a pod shuts down — is sent once more, on
    /// another address when there is one (RFC 9113, 8.7). A request whose
    /// body is still arriving is not: what was sent of it is gone.
    pub async fn call(&self, request: Request<Body>) -> Result<Response<Body>, UpstreamError> {
        let (mut head, mut body) = request.into_parts();
        head.uri = self.origin.uri_for(&head.uri);
        // HTTP/2 names the origin in `:authority` alone (RFC 9113, 8.3.1).
        head.headers.remove(http::header::HOST);
        let arrived = Arrived::take(&mut body).map_err(UpstreamError::RequestBody)?;
        let ready = self.ready_sender(None).await?;
        if !arrived.complete {
            let head = Request::from_parts(head, ());
            return self
                .attempt(ready, head, &arrived, Some(body))
                .await
                .map_err(|failed| failed.error);
        }
        let failed = match self.attempt(ready, h2_head(&head), &arrived, None).await {
            Ok(response) => return Ok(response),
            Err(failed) => failed,
        };
        let Some(endpoint) = failed.unprocessed_at else {
            return Err(failed.error);
        };
        tracing::debug!(
            address = %endpoint.address,
            error = %failed.error,
            "the upstream did not process a call; sending it again"
        );
        let ready = self.ready_sender(Some(&endpoint)).await?;
        self.attempt(ready, Request::from_parts(head, ()), &arrived, None)
            .await
            .map_err(|failed| failed.error)
    }

    /// Sends the call on `ready`'s connection: its head, the body that has
    /// arrived, and `rest`, the body still arriving, if any.
    async fn attempt(
        &self,
        ready: Ready,
        head: Request<()>,
        arrived: &Arrived,
        rest: Option<Body>,
    ) -> Result<Response<Body>, Failed> {
        let Ready {
            mut load,
            mut sender,
            connection,
        } = ready;
        let empty = arrived.is_empty();
        // Nothing of the call has been sent when h2 refuses to open its
        // stream: the connection has failed since it was ready, or has run
        // out of stream ids (2^30 calls), so a new one is opened for it.
        let (response, mut stream) = sender
            .send_request(head, empty)
            .map_err(|error| Failed::unprocessed(error, &load, connection))?;
        // Writing fails only when the stream is over already (reset,
        // refused, its connection gone), which the response then reports
        // with its cause; the reset keeps the upstream from waiting on the
        // rest of a body otherwise.
        if !empty && arrived.send(&mut stream).is_err() {
            stream.send_reset(Reason::CANCEL);
        }
        // A body still arriving is copied on by a task of its own; a whole
        // one leaves the request's stream with the response's.
        let mut copying = CancelOnDrop(None);
        let written = match rest {
            None => Some(stream),
            Some(body) => {
                let task = tokio::spawn(copy_body(body, stream).in_current_span());
                copying = CancelOnDrop(Some(task.abort_handle()));
                None
            }
        };
        // After the call has woken its connection's task, which then has
        // nothing left to wake.
        load.release_ended();
        // Dropped before the response (the caller gone, the gateway's
        // timeout), `copying` stops the copy, and with its last handle on
        // the stream gone h2 resets it: the upstream stops working for no
        // one, and its answer does not sit in the connection's window.
        let response = response
            .await
            .map_err(|error| Failed::sent(error, &load, connection))?;
        load.answered();
        Ok(response.map(|recv| Body::new(UpstreamBody::new(recv, written, copying, load))))
    }

    /// A connection ready for one more stream, on the endpoint chosen for
    /// the call (other than `not`, when there is another), or on another
    /// when that one cannot be reached.
    async fn ready_sender(&self, not: Option<&Arc<Endpoint>>) -> Result<Ready, UpstreamError> {
        let endpoints = self.addresses.current().await?;
        let chosen = match not {
            Some(not) => instead_of(&endpoints, not).or(Some(not)),
            None => choose(&endpoints),
        };
        let Some(chosen) = chosen else {
            return Err(UpstreamError::Resolve {
                host: self.origin.authority.host().to_string(),
                reason: "no addresses".into(),
            });
        };
        let tried = self.try_endpoint(chosen).await;
        match tried {
            Err(err) if err.is_connecting() => {
                self.addresses.resolve_soon();
                match instead_of(&endpoints, chosen) {
                    Some(other) => self.try_endpoint(other).await,
                    None => Err(err),
                }
            }
            tried => tried,
        }
    }

    async fn try_endpoint(&self, endpoint: &Arc<Endpoint>) -> Result<Ready, UpstreamError> {
        let load = Load::new(endpoint);
        let (connection, sender) = endpoint.ready_sender(&self.origin).await?;
        Ok(Ready {
            load,
            sender,
            connection,
        })
    }
}

/// A connection ready for one more stream, and the call counted against
/// its endpoint.
struct Ready {
    load: Load,
    sender: h2::client::SendRequest<Bytes>,
    /// The connection's number on its endpoint.
    connection: u64,
}

/// How an attempt to send a call failed.
struct Failed {
    error: UpstreamError,
    /// The endpoint, when the upstream cannot have processed the call, so
    /// it may be sent again.
    unprocessed_at: Option<Arc<Endpoint>>,
}

impl Failed {
    fn unprocessed(error: h2::Error, load: &Load, connection: u64) -> Failed {
        load.endpoint().forget(connection);
        Failed {
            error: error.into(),
            unprocessed_at: Some(Arc::clone(load.endpoint())),
        }
    }

    /// A failure once the stream was open: the upstream may have processed
    /// the call, unless it refused the stream or went away before it.
    fn sent(error: h2::Error, load: &Load, connection: u64) -> Failed {
        // h2 fails a stream with the peer's GOAWAY only when the stream is
        // above the GOAWAY's last stream id, which the peer never processed
        // (whatever its error code); the streams it kept fail, if they
        // do, as the connection's end (an I/O error).
        let went_away = error.is_go_away() && error.is_remote();
        if went_away {
            // Calls still on it end there; new ones go to a new connection.
            load.endpoint().forget(connection);
        }
        let refused = went_away
            || (error.is_remote()
                && error.is_reset()
                && error.reason() == Some(Reason::REFUSED_STREAM));
        Failed {
            unprocessed_at: refused.then(|| Arc::clone(load.endpoint())),
            error: error.into(),
        }
    }
}

/// The head h2 sends, copied so the call can be sent again: h2 keeps none
/// of a request's extensions.
fn h2_head(head: &http::request::Parts) -> Request<()> {
    let mut request = Request::new(());
    *request.method_mut() = head.method.clone();
    *request.uri_mut() = head.uri.clone();
    *request.version_mut() = head.version;
    *request.headers_mut() = head.headers.clone();
    request
}

/// An upstream as a tonic client's transport. A call that fails before its
/// response is logged with its detail (the address, the reason) and
/// answered with [`UpstreamError::status`], which names neither: the
/// caller's own callers may hear it.
impl tower::Service<Request<Body>> for Upstream {
    type Response = Response<Body>;
    type Error = Status;
    type Future = BoxFuture<'static, Result<Response<Body>, Status>>;

    fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Status>> {
        // Calls wait for a connection in `call`, each on its own address.
        Poll::Ready(Ok(()))
    }

    fn call(&mut self, request: Request<Body>) -> Self::Future {
        let upstream = self.clone();
        // A tonic client's deadline (`Request::set_timeout`) travels as
        // `grpc-timeout`. The upstream keeps to it on its side; here the
        // caller stops waiting for a response that has not begun by then,
        // as tonic's own channel does, so a stalled pod cannot hold it
        // until the pings give up.
        let deadline = request
            .headers()
            .get("grpc-timeout")
            .and_then(|value| value.to_str().ok())
            .and_then(parse_grpc_timeout);
        Box::pin(async move {
            let service = upstream.origin.authority.as_str();
            let call = upstream.call(request);
            let called = match deadline {
                None => call.await,
                Some(deadline) => tokio::time::timeout(deadline, call).await.map_err(|_| {
                    Status::deadline_exceeded(format!(
                        "{service} did not answer within the deadline"
                    ))
                })?,
            };
            called.map_err(|err| {
                tracing::warn!(upstream = service, error = %err, "a call failed before its response");
                err.status(service)
            })
        })
    }
}

/// Parses a `grpc-timeout` header: up to 8 digits and a unit (H, M, S, m,
/// u, n), per the gRPC over HTTP/2 protocol.
pub fn parse_grpc_timeout(value: &str) -> Option<Duration> {
    if value.len() < 2 || value.len() > 9 {
        return None;
    }
    let (digits, unit) = value.split_at(value.len() - 1);
    if !digits.bytes().all(|b| b.is_ascii_digit()) {
        return None;
    }
    let amount: u64 = digits.parse().ok()?;
    Some(match unit {
        "H" => Duration::from_secs(amount * 3600),
        "M" => Duration::from_secs(amount * 60),
        "S" => Duration::from_secs(amount),
        "m" => Duration::from_millis(amount),
        "u" => Duration::from_micros(amount),
        "n" => Duration::from_nanos(amount),
        _ => return None,
    })
}

impl Origin {
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

#[cfg(test)]
mod tests {
    use std::convert::Infallible;
    use std::net::SocketAddr;

    use http::HeaderMap;
    use http_body::Frame;
    use http_body_util::BodyExt;

    use crate::CancellationToken;
    use http::HeaderValue;
    use http_body_util::StreamBody;
    use tokio::net::TcpListener;
    use tokio::sync::mpsc;
    use tokio_stream::wrappers::ReceiverStream;
    use tonic::server::NamedService;

    use super::*;

    /// What a test upstream answers; [`Served`] makes it a gRPC service.
    trait Answer: Clone + Send + Sync + 'static {
        const NAME: &'static str;
        fn answer(&self, request: Request<Body>) -> BoxFuture<'static, Response<Body>>;
    }

    #[derive(Clone)]
    struct Served<A>(A);

    impl<A: Answer> NamedService for Served<A> {
        const NAME: &'static str = A::NAME;
    }

    impl<A: Answer> tower::Service<Request<Body>> for Served<A> {
        type Response = Response<Body>;
        type Error = Infallible;
        type Future = BoxFuture<'static, Result<Response<Body>, Infallible>>;

        fn poll_ready(&mut self, _cx: &mut Context<'_>) -> Poll<Result<(), Infallible>> {
            Poll::Ready(Ok(()))
        }

        fn call(&mut self, request: Request<Body>) -> Self::Future {
            let answer = self.0.answer(request);
            Box::pin(async move { Ok(answer.await) })
        }
    }

    /// An upstream that answers any call with the request's body, frame
    /// by frame as it arrives, then trailers naming the path and authority
    /// it saw and the port it listens on, and echoing the caller's
    /// `x-probe` metadata. `/test.Echo/Whole` answers only once the whole
    /// request has arrived, as a unary handler does.
    #[derive(Clone)]
    struct Echo(u16);

    impl Answer for Echo {
        const NAME: &'static str = "test.Echo";

        fn answer(&self, request: Request<Body>) -> BoxFuture<'static, Response<Body>> {
            let mut trailers = HeaderMap::new();
            trailers.insert("grpc-status", HeaderValue::from_static("0"));
            let seen = format!("{} {:?}", request.uri().path(), request.uri().authority());
            trailers.insert("x-seen", HeaderValue::from_str(&seen).expect("header"));
            trailers.insert("x-server", HeaderValue::from(self.0));
            if let Some(probe) = request.headers().get("x-probe") {
                trailers.insert("x-probe", probe.clone());
            }
            if let Some(host) = request.headers().get(http::header::HOST) {
                trailers.insert("x-host", host.clone());
            }
            let whole = request.uri().path().ends_with("/Whole");
            let body = request
                .into_body()
                .with_trailers(async move { Some(Ok(trailers)) });
            if !whole {
                return Box::pin(std::future::ready(Response::new(Body::new(body))));
            }
            Box::pin(async move {
                let collected = body.collect().await.expect("the request body");
                let trailers = collected.trailers().cloned();
                let data = collected.to_bytes();
                let answer =
                    http_body_util::Full::new(data).with_trailers(async move { trailers.map(Ok) });
                Response::new(Body::new(answer))
            })
        }
    }

    /// An upstream that reads a call's whole request body and tells the
    /// test whether it ended well or was reset. `/test.Drain/Late` answers
    /// once the body has ended; `/test.Drain/Early` answers at once with a
    /// response that stays open.
    #[derive(Clone)]
    struct Drain(mpsc::UnboundedSender<bool>);

    impl Answer for Drain {
        const NAME: &'static str = "test.Drain";

        fn answer(&self, request: Request<Body>) -> BoxFuture<'static, Response<Body>> {
            let report = self.0.clone();
            let report_reset = self.0.clone();
            let early = request.uri().path().ends_with("/Early");
            let drained = async move {
                let ended_well = request.into_body().collect().await.is_ok();
                let _ = report.send(ended_well);
            };
            Box::pin(async move {
                if early {
                    tokio::spawn(drained);
                    // Reports `false` when the server lets go of the open
                    // response: the caller reset the stream.
                    let reset = ReportOnDrop(report_reset);
                    let open = futures::stream::poll_fn(move |_| {
                        let _held = &reset;
                        Poll::<Option<Result<Frame<Bytes>, Status>>>::Pending
                    });
                    Response::new(Body::new(StreamBody::new(open)))
                } else {
                    drained.await;
                    Response::new(Body::empty())
                }
            })
        }
    }

    struct ReportOnDrop(mpsc::UnboundedSender<bool>);

    impl Drop for ReportOnDrop {
        fn drop(&mut self) {
            let _ = self.0.send(false);
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
        let port = listener.local_addr().expect("addr").port();
        let server = crate::server::GrpcServer::new()
            .without_reflection()
            .add_service(Served(Echo(port)))
            .add_service(Served(Drain(drained)));
        tokio::spawn(server.serve(listener, shutdown.clone()));
        shutdown
    }

    async fn echo_upstream() -> (Upstream, SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let shutdown = serve_echo(listener).await;
        let upstream = plain_upstream(addr);
        (upstream, addr, shutdown)
    }

    fn plain_upstream(addr: SocketAddr) -> Upstream {
        Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream")
    }

    fn timed_upstream(addr: SocketAddr, timing: Timing) -> Upstream {
        Upstream::with(
            &ClientTls::default(),
            &format!("http://{addr}"),
            timing,
            Arc::new(SystemResolver),
        )
        .expect("upstream")
    }

    pub(super) fn request(body: Body) -> Request<Body> {
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
    pub(super) async fn read_all(body: Body) -> (Vec<u8>, HeaderMap) {
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
    async fn an_upstream_that_is_down_fails_calls_at_once_and_is_reconnected_once_it_returns() {
        let (addr, reserved) = closed_address();
        let timing = Timing {
            backoff_first: Duration::from_millis(20),
            backoff_longest: Duration::from_millis(80),
            ..Timing::default()
        };
        let upstream = timed_upstream(addr, timing);
        refused_call(&upstream).await;
        // Tried again in the background, less often with each failure: at
        // 20, 40, 80, 80… ms rather than every 20 ms.
        tokio::time::sleep(Duration::from_secs(1)).await;
        let attempts = upstream
            .addresses
            .per_endpoint(Endpoint::connection_attempts)[0];
        assert!((3..=25).contains(&attempts), "{attempts} attempts in 1 s");
        // Meanwhile calls hear the last failure.
        refused_call(&upstream).await;

        // It comes back: the background attempt connects, with no call
        // needed, and calls go there again.
        let mut shutdown = serve_echo(reserved.listen(64).expect("listen")).await;
        let reconnected = async {
            while upstream.addresses.loads()[0].0 {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), reconnected)
            .await
            .expect("reconnected in the background");
        let attempts = upstream
            .addresses
            .per_endpoint(Endpoint::connection_attempts);
        for _restart in 0..2 {
            let response = upstream
                .call(request(Body::empty()))
                .await
                .expect("reconnected");
            let (_, trailers) = read_all(response.into_body()).await;
            assert_eq!(trailers["grpc-status"], "0");
            // The upstream stops (closing its connection) and comes back:
            // a connection that closed is opened again by the next call.
            shutdown.cancel();
            tokio::time::sleep(Duration::from_millis(200)).await;
            shutdown = serve_echo(TcpListener::bind(addr).await.expect("rebind")).await;
        }
        let after = upstream
            .addresses
            .per_endpoint(Endpoint::connection_attempts);
        assert_eq!(after[0], attempts[0] + 1, "one more connection, no retries");
    }

    /// Makes a call that must fail before its response.
    async fn unanswered_call(upstream: &Upstream) -> UpstreamError {
        upstream
            .call(request(Body::empty()))
            .await
            .expect_err("a failure before the response")
    }

    /// Makes a call that fails because its address refused to connect.
    async fn refused_call(upstream: &Upstream) {
        let refused = unanswered_call(upstream).await;
        assert!(
            matches!(refused.underlying(), UpstreamError::Connect { .. }),
            "{refused:?}"
        );
    }

    #[test]
    fn each_failure_in_a_row_doubles_the_backoff_up_to_its_longest() {
        let timing = Timing::default();
        let backoffs: Vec<u64> = [1, 2, 3, 4, 5, u32::MAX]
            .into_iter()
            .map(|failures| timing.backoff(failures).as_secs())
            .collect();
        assert_eq!(backoffs, [1, 2, 4, 8, 10, 10]);
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
    pub(super) fn endless_body() -> (mpsc::Sender<Result<Frame<Bytes>, Status>>, Body) {
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
        let upstream = plain_upstream(addr);
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
    async fn a_response_dropped_before_its_end_resets_a_whole_requests_stream() {
        let (upstream, mut reports, _shutdown) = drain_upstream().await;
        let whole = Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")));
        let response = upstream
            .call(request_to("/test.Drain/Early", whole))
            .await
            .expect("answered");
        assert_eq!(
            next_report(&mut reports).await,
            Some(true),
            "the request ended"
        );
        drop(response);
        assert_eq!(
            next_report(&mut reports).await,
            Some(false),
            "the upstream's open response is reset with the caller gone"
        );
        assert_eq!(upstream.addresses.per_endpoint(Endpoint::ended_count), [0]);
    }

    #[tokio::test]
    async fn an_upstream_that_stops_answering_fails_its_calls_by_the_pings() {
        // Connections are accepted (by the kernel) and never answered.
        let silent = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = silent.local_addr().expect("addr");
        let timing = Timing {
            ping_interval: std::time::Duration::from_millis(100),
            ping_timeout: std::time::Duration::from_millis(200),
            ..Timing::default()
        };
        let upstream = timed_upstream(addr, timing);
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
            domain: Some("localhost".into()),
            ..ClientTls::default()
        };
        let timing = Timing {
            connect: std::time::Duration::from_millis(300),
            ..Timing::default()
        };
        let upstream = Upstream::with(
            &tls,
            &format!("https://{addr}"),
            timing,
            Arc::new(SystemResolver),
        )
        .expect("upstream");

        let calls = (0..3).map(|_| upstream.call(request(Body::empty())));
        for failed in futures::future::join_all(calls).await {
            let err = failed.expect_err("no handshake");
            assert!(
                matches!(err.underlying(), UpstreamError::ConnectTimedOut { .. }),
                "each call hears what the attempt met: {err:?}"
            );
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
        // A call while the address is failing hears that failure without an
        // attempt of its own (the background one comes a second later).
        let failing = unanswered_call(&upstream).await;
        assert!(
            matches!(failing.underlying(), UpstreamError::ConnectTimedOut { .. }),
            "{failing:?}"
        );
        assert!(accepted.try_recv().is_err(), "no new connection");
    }

    /// A resolver the test moves between addresses.
    pub(super) struct Moving(pub(super) std::sync::Mutex<Vec<SocketAddr>>);

    impl Resolve for Moving {
        fn resolve(
            &self,
            _: &str,
            _: u16,
        ) -> futures::future::BoxFuture<'static, std::io::Result<Vec<SocketAddr>>> {
            let addresses = self.0.lock().expect("lock").clone();
            Box::pin(async move { Ok(addresses) })
        }
    }

    /// An address that refuses connections, kept from other tests while
    /// the socket lives (bound, not listening).
    fn closed_address() -> (SocketAddr, tokio::net::TcpSocket) {
        let socket = tokio::net::TcpSocket::new_v4().expect("socket");
        socket
            .bind(SocketAddr::from(([127, 0, 0, 1], 0)))
            .expect("bind");
        (socket.local_addr().expect("addr"), socket)
    }

    pub(super) async fn echo_server() -> (SocketAddr, CancellationToken) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        (addr, serve_echo(listener).await)
    }

    /// An upstream named `profiles.test`, resolving to what `resolver` says.
    fn named_upstream(resolver: Arc<Moving>, resolve_interval: Duration) -> Upstream {
        Upstream::with(
            &ClientTls::default(),
            "http://profiles.test:50052",
            Timing::resolving_every(resolve_interval),
            resolver,
        )
        .expect("upstream")
    }

    /// The port of the server that answered a unary call.
    async fn server_of(upstream: &Upstream) -> u16 {
        let response = upstream.call(request(Body::empty())).await.expect("call");
        let (_, trailers) = read_all(response.into_body()).await;
        assert_eq!(trailers["grpc-status"], "0");
        trailers["x-server"]
            .to_str()
            .expect("port")
            .parse()
            .expect("port")
    }

    #[tokio::test]
    async fn calls_are_spread_over_every_address_of_the_name() {
        let (a, _a) = echo_server().await;
        let (b, _b) = echo_server().await;
        let upstream = named_upstream(
            Arc::new(Moving(std::sync::Mutex::new(vec![a, b]))),
            Duration::from_secs(60),
        );
        // Calls waiting for their response load their address, so the next
        // goes to the other.
        let mut bodies = Vec::new();
        let mut answers = Vec::new();
        for _ in 0..4 {
            let (frames, answer) = waiting_call(&upstream).await;
            bodies.push(frames);
            answers.push(answer);
        }
        drop(bodies);
        let mut ports = Vec::new();
        for answer in answers {
            ports.push(answer.await.expect("answered"));
        }
        ports.sort_unstable();
        let mut expected = vec![a.port(), a.port(), b.port(), b.port()];
        expected.sort_unstable();
        assert_eq!(ports, expected, "two calls on each address");
    }

    #[tokio::test]
    async fn a_name_is_resolved_by_the_system_resolver() {
        let (addr, _shutdown) = echo_server().await;
        let upstream = Upstream::new(
            &ClientTls::default(),
            &format!("http://localhost:{}", addr.port()),
        )
        .expect("upstream");
        // Whichever loopback addresses `localhost` has, the call reaches the
        // one listening.
        assert_eq!(server_of(&upstream).await, addr.port());
    }

    #[tokio::test]
    async fn calls_follow_the_name_to_new_addresses() {
        let (a, _a) = echo_server().await;
        let (b, _b) = echo_server().await;
        let resolver = Arc::new(Moving(std::sync::Mutex::new(vec![a])));
        let upstream = named_upstream(resolver.clone(), Duration::from_millis(50));
        assert_eq!(server_of(&upstream).await, a.port());

        // The pod behind `a` is replaced by `b`.
        *resolver.0.lock().expect("lock") = vec![b];
        let moved = async {
            while server_of(&upstream).await != b.port() {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), moved)
            .await
            .expect("calls reach the new address after a resolution");
        for _ in 0..10 {
            assert_eq!(
                server_of(&upstream).await,
                b.port(),
                "the old address is left"
            );
        }
    }

    #[tokio::test]
    async fn a_call_to_an_address_that_refuses_goes_to_another() {
        let (live, _live) = echo_server().await;
        let (dead, _reserved) = closed_address();
        // Each new upstream's first call picks either address.
        for _ in 0..10 {
            let resolver = Arc::new(Moving(std::sync::Mutex::new(vec![dead, live])));
            let upstream = named_upstream(resolver.clone(), Duration::from_secs(60));
            assert_eq!(server_of(&upstream).await, live.port());
            assert_eq!(server_of(&upstream).await, live.port());
        }
    }

    #[tokio::test]
    async fn an_address_that_refuses_has_the_name_resolved_again_soon() {
        let (live, _live) = echo_server().await;
        let (dead, _reserved) = closed_address();
        let resolver = Arc::new(Moving(std::sync::Mutex::new(vec![dead])));
        let upstream = named_upstream(resolver.clone(), Duration::from_secs(600));
        refused_call(&upstream).await;
        // The pod was replaced; the name says so long before the interval.
        *resolver.0.lock().expect("lock") = vec![live];
        let recovered = async {
            loop {
                if let Ok(response) = upstream.call(request(Body::empty())).await {
                    let (_, trailers) = read_all(response.into_body()).await;
                    assert_eq!(trailers["grpc-status"], "0");
                    return;
                }
                tokio::time::sleep(Duration::from_millis(100)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), recovered)
            .await
            .expect("resolved again within seconds of the refusal");
    }

    /// A call to `/test.Echo/Whole` whose body does not end until the
    /// returned sender is dropped, started once it counts against its
    /// address; it answers the port of the server that took it.
    pub(super) async fn waiting_call(
        upstream: &Upstream,
    ) -> (
        mpsc::Sender<Result<Frame<Bytes>, Status>>,
        tokio::task::JoinHandle<u16>,
    ) {
        let waiting_before: usize = upstream.addresses.loads().iter().map(|l| l.1).sum();
        let (frames, body) = endless_body();
        let caller = upstream.clone();
        let answer = tokio::spawn(async move {
            let response = caller
                .call(request_to("/test.Echo/Whole", body))
                .await
                .expect("call");
            let (_, trailers) = read_all(response.into_body()).await;
            trailers["x-server"]
                .to_str()
                .expect("port")
                .parse::<u16>()
                .expect("port")
        });
        let counted = async {
            while upstream
                .addresses
                .loads()
                .iter()
                .map(|l| l.1)
                .sum::<usize>()
                == waiting_before
            {
                tokio::task::yield_now().await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), counted)
            .await
            .expect("the call counts against its address");
        (frames, answer)
    }

    #[tokio::test]
    async fn calls_count_against_their_address_until_their_response_begins() {
        let (a, _a) = echo_server().await;
        let upstream = named_upstream(
            Arc::new(Moving(std::sync::Mutex::new(vec![a]))),
            Duration::from_secs(60),
        );
        server_of(&upstream).await;
        assert_eq!(upstream.addresses.loads(), [(false, 0)]);
        let (frames, answer) = waiting_call(&upstream).await;
        assert_eq!(upstream.addresses.loads(), [(false, 1)]);
        drop(frames);
        assert_eq!(answer.await.expect("answered"), a.port());
        assert_eq!(upstream.addresses.loads(), [(false, 0)]);
        // A stream whose response has begun is not load, however long it
        // stays open.
        let (frames, body) = endless_body();
        let open = upstream.call(request(body)).await.expect("call");
        assert_eq!(upstream.addresses.loads(), [(false, 0)]);
        drop((frames, open));
    }

    #[tokio::test]
    async fn an_ended_calls_stream_is_let_go_by_the_next_call_and_an_abandoned_one_at_once() {
        let (upstream, _addr, _shutdown) = echo_upstream().await;
        for _ in 0..3 {
            let whole = Body::new(http_body_util::Full::new(Bytes::from_static(b"\0\0\0\0\0")));
            let response = upstream.call(request(whole)).await.expect("call");
            let (_, trailers) = read_all(response.into_body()).await;
            assert_eq!(trailers["grpc-status"], "0");
            assert_eq!(
                upstream.addresses.per_endpoint(Endpoint::ended_count),
                [1],
                "each call lets go of the one before"
            );
        }
        let (frames, body) = endless_body();
        let response = upstream.call(request(body)).await.expect("call");
        assert_eq!(upstream.addresses.per_endpoint(Endpoint::ended_count), [0]);
        drop(response);
        drop(frames);
        assert_eq!(
            upstream.addresses.per_endpoint(Endpoint::ended_count),
            [0],
            "a response dropped before its end is not kept"
        );
    }

    #[tokio::test]
    async fn an_idle_address_lets_its_ended_streams_go_at_the_next_ping() {
        let (addr, _shutdown) = echo_server().await;
        let timing = Timing {
            ping_interval: Duration::from_millis(50),
            ..Timing::default()
        };
        let upstream = timed_upstream(addr, timing);
        one_call_ended(&upstream).await;
        ended_streams_let_go(&upstream, "by the keepalive").await;
    }

    /// Makes one call, which leaves its ended stream to its address.
    async fn one_call_ended(upstream: &Upstream) {
        let response = upstream.call(request(Body::empty())).await.expect("call");
        read_all(response.into_body()).await;
        assert_eq!(upstream.addresses.per_endpoint(Endpoint::ended_count), [1]);
    }

    /// Waits, up to 5 s, for the upstream's address to hold no ended stream.
    async fn ended_streams_let_go(upstream: &Upstream, by: &str) {
        let let_go = async {
            while upstream.addresses.per_endpoint(Endpoint::ended_count) != [0] {
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), let_go)
            .await
            .unwrap_or_else(|_| panic!("ended streams not let go {by}"));
    }

    #[tokio::test]
    async fn a_closed_connection_lets_its_ended_streams_go() {
        let (addr, shutdown) = echo_server().await;
        let upstream = plain_upstream(addr);
        one_call_ended(&upstream).await;
        shutdown.cancel();
        ended_streams_let_go(&upstream, "when the connection ended").await;
    }

    #[tokio::test]
    async fn a_call_that_outlives_its_connection_lets_its_stream_go_at_once() {
        // An upstream that answers a call's headers, then drops the
        // connection while the response is still open.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let (close, closed) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(tcp).await.expect("handshake");
            let (_, mut respond) = connection
                .accept()
                .await
                .expect("a call")
                .expect("its request");
            let _open = respond
                .send_response(Response::new(()), false)
                .expect("headers");
            tokio::select! {
                _ = closed => {}
                _ = std::future::poll_fn(|cx| connection.poll_closed(cx)) => {}
            }
        });
        let upstream = plain_upstream(addr);
        let mut body = upstream
            .call(request(Body::empty()))
            .await
            .expect("headers")
            .into_body();
        close.send(()).expect("the server waits");
        let ended = body.frame().await;
        assert!(matches!(ended, Some(Err(_))), "{ended:?}");
        let forgotten = async {
            while upstream.addresses.per_endpoint(Endpoint::has_connection) != [false] {
                tokio::time::sleep(Duration::from_millis(10)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), forgotten)
            .await
            .expect("the closed connection is forgotten");
        // The connection's end has let go of what it held; the call ends
        // after, with no later call or ping on that connection to come.
        drop(body);
        assert_eq!(upstream.addresses.per_endpoint(Endpoint::ended_count), [0]);
    }

    #[tokio::test]
    async fn an_address_that_failed_takes_calls_again_once_it_answers() {
        let (a, _a) = echo_server().await;
        let (b, reserved) = closed_address();
        let resolver = Arc::new(Moving(std::sync::Mutex::new(vec![b])));
        let timing = Timing {
            backoff_first: Duration::from_millis(200),
            backoff_longest: Duration::from_millis(400),
            ..Timing::resolving_every(Duration::from_millis(50))
        };
        let upstream = Upstream::with(
            &ClientTls::default(),
            "http://profiles.test:50052",
            timing,
            resolver.clone(),
        )
        .expect("upstream");
        assert!(upstream.call(request(Body::empty())).await.is_err());
        // The name lists another address too; calls go there.
        *resolver.0.lock().expect("lock") = vec![a, b];
        let resolved = async {
            while upstream.addresses.loads().len() < 2 {
                let _ = upstream.call(request(Body::empty())).await;
                tokio::time::sleep(Duration::from_millis(20)).await;
            }
        };
        tokio::time::timeout(Duration::from_secs(5), resolved)
            .await
            .expect("resolved again");
        // The pod behind `b` restarts at the same address.
        let _b = serve_echo(reserved.listen(64).expect("listen")).await;
        let spread = async {
            loop {
                tokio::time::sleep(Duration::from_millis(100)).await;
                // Two calls waiting go one to each address once `b` is no
                // longer passed over.
                let mut held = Vec::new();
                for _ in 0..2 {
                    held.push(waiting_call(&upstream).await);
                }
                if upstream.addresses.loads() == [(false, 1), (false, 1)] {
                    return;
                }
            }
        };
        tokio::time::timeout(Duration::from_secs(5), spread)
            .await
            .expect("the address takes calls again");
    }
}

/// Calls the upstream never processed, sent again.
#[cfg(test)]
mod retry_tests {
    use std::net::SocketAddr;
    use std::sync::atomic::{AtomicUsize, Ordering};
    use std::sync::{Arc, Mutex};

    use http_body::Frame;
    use tokio::net::{TcpListener, TcpStream};

    use super::tests::{Moving, echo_server, endless_body, read_all, request};
    use super::*;

    /// A server that answers every stream with a reset for `reason`; it
    /// counts the streams it saw.
    async fn resetting_server(reason: Reason) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                let counted = Arc::clone(&counted);
                tokio::spawn(async move {
                    let Ok(mut connection) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    while let Some(Ok((_, mut respond))) = connection.accept().await {
                        counted.fetch_add(1, Ordering::SeqCst);
                        respond.send_reset(reason);
                    }
                });
            }
        });
        (addr, seen)
    }

    /// A server going away: once a connection's first request has arrived,
    /// and before it has processed any, it sends a `GOAWAY` for `reason`
    /// (`NO_ERROR`: shutting down gracefully) whose last stream is none of
    /// them. It counts connections.
    async fn going_away_server(reason: Reason) -> (SocketAddr, Arc<AtomicUsize>) {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        let seen = Arc::new(AtomicUsize::new(0));
        let counted = Arc::clone(&seen);
        tokio::spawn(async move {
            while let Ok((tcp, _)) = listener.accept().await {
                counted.fetch_add(1, Ordering::SeqCst);
                tokio::spawn(async move {
                    request_arrived(&tcp).await;
                    let Ok(mut connection) = h2::server::handshake(tcp).await else {
                        return;
                    };
                    connection.abrupt_shutdown(reason);
                    while connection.accept().await.is_some() {}
                });
            }
        });
        (addr, seen)
    }

    /// Waits until a HEADERS frame follows the client's preface, without
    /// reading it, so the GOAWAY cannot overtake the request.
    async fn request_arrived(tcp: &TcpStream) {
        const PREFACE: usize = 24;
        const HEADERS: u8 = 0x1;
        let mut buffer = vec![0; 64 * 1024];
        loop {
            let peeked = tcp.peek(&mut buffer).await.expect("peek");
            let mut at = PREFACE;
            while at + 9 <= peeked {
                if buffer[at + 3] == HEADERS {
                    return;
                }
                let length = usize::from(buffer[at]) << 16
                    | usize::from(buffer[at + 1]) << 8
                    | usize::from(buffer[at + 2]);
                at += 9 + length;
            }
            tokio::time::sleep(Duration::from_millis(5)).await;
        }
    }

    fn upstream_of(addresses: Vec<SocketAddr>) -> Upstream {
        Upstream::with(
            &ClientTls::default(),
            "http://profiles.test:50052",
            Timing::default(),
            Arc::new(Moving(Mutex::new(addresses))),
        )
        .expect("upstream")
    }

    /// Calls with a body, each answered by the echo server.
    async fn calls_answered(upstream: &Upstream, calls: usize) {
        for _ in 0..calls {
            let body = Body::new(http_body_util::Full::new(Bytes::from_static(b"again")));
            let response = upstream.call(request(body)).await.expect("answered");
            let (echoed, trailers) = read_all(response.into_body()).await;
            assert_eq!(echoed, b"again");
            assert_eq!(trailers["grpc-status"], "0");
        }
    }

    // Idle addresses are chosen at random, so 24 calls all missing one of
    // two would happen once in sixteen million runs.

    #[tokio::test]
    async fn a_refused_stream_is_sent_again_on_another_address() {
        let (refusing, refused) = resetting_server(Reason::REFUSED_STREAM).await;
        let (echo, _echo) = echo_server().await;
        let upstream = upstream_of(vec![refusing, echo]);
        calls_answered(&upstream, 24).await;
        assert!(refused.load(Ordering::SeqCst) > 0);
    }

    #[tokio::test]
    async fn a_call_a_graceful_goaway_left_unprocessed_is_sent_again() {
        let (leaving, connections) = going_away_server(Reason::NO_ERROR).await;
        let (echo, _echo) = echo_server().await;
        let upstream = upstream_of(vec![leaving, echo]);
        calls_answered(&upstream, 24).await;
        assert!(connections.load(Ordering::SeqCst) > 0);
    }

    /// One call to `server`, its only address: the code it failed with and
    /// what the server counted.
    async fn failed_call(server: (SocketAddr, Arc<AtomicUsize>)) -> (Code, usize) {
        let (address, counted) = server;
        let failed = upstream_of(vec![address])
            .call(request(Body::empty()))
            .await
            .expect_err("the call fails");
        (failed.code(), counted.load(Ordering::SeqCst))
    }

    #[tokio::test]
    async fn a_call_is_sent_again_once_and_only_when_unprocessed() {
        // One address refusing everything: the call is sent twice, then
        // fails as a refused stream does.
        let refusing = resetting_server(Reason::REFUSED_STREAM).await;
        assert_eq!(failed_call(refusing).await, (Code::Unavailable, 2));
        // A stream reset for any other reason may have had its effect.
        let failing = resetting_server(Reason::INTERNAL_ERROR).await;
        assert_eq!(failed_call(failing).await, (Code::Internal, 1));
        // A GOAWAY fails only the streams it did not keep, whatever its
        // error: the call goes again, on a new connection.
        let broken = going_away_server(Reason::INTERNAL_ERROR).await;
        assert_eq!(failed_call(broken).await, (Code::Unavailable, 2));
    }

    #[tokio::test]
    async fn a_connection_out_of_stream_ids_is_replaced_without_failing_a_call() {
        // Three streams per connection (client ids are odd, the last
        // 2^31 - 1); in use, a connection runs out after 2^30 calls, some
        // twelve hours at 25k calls a second. h2 then no longer says the
        // connection is ready, and a new one is opened; a call that raced
        // to it goes again, its stream never opened.
        let (echo, _echo) = echo_server().await;
        let timing = Timing {
            first_stream_id: (1 << 31) - 5,
            ..Timing::default()
        };
        let upstream = Upstream::with(
            &ClientTls::default(),
            "http://profiles.test:50052",
            timing,
            Arc::new(Moving(Mutex::new(vec![echo]))),
        )
        .expect("upstream");
        calls_answered(&upstream, 8).await;
        assert_eq!(
            upstream
                .addresses
                .per_endpoint(Endpoint::connection_attempts),
            [3]
        );
    }

    #[tokio::test]
    async fn a_call_whose_body_is_still_arriving_is_not_sent_again() {
        let (refusing, refused) = resetting_server(Reason::REFUSED_STREAM).await;
        let upstream = upstream_of(vec![refusing]);
        let (frames, body) = endless_body();
        frames
            .send(Ok(Frame::data(Bytes::from_static(b"first"))))
            .await
            .expect("send");
        let failed = upstream.call(request(body)).await.expect_err("refused");
        assert_eq!(failed.code(), Code::Unavailable);
        assert_eq!(refused.load(Ordering::SeqCst), 1);
    }
}

/// The upstream as the transport of tonic's clients, as every component's
/// clients of the others use it.
#[cfg(test)]
mod client_tests {
    use std::net::SocketAddr;
    use std::sync::{Arc, Mutex};

    use http::uri::PathAndQuery;
    use tokio::net::TcpListener;
    use tonic::client::Grpc;
    use tonic_prost::ProstCodec;

    use super::tests::{Moving, echo_server};
    use super::*;

    /// One unary call with an empty message through a tonic client; the
    /// echo upstream names its port in the trailers, which tonic merges
    /// into the answer's metadata.
    async fn echo(client: &mut Grpc<Upstream>) -> Result<u16, Status> {
        client.ready().await?;
        let answer = client
            .unary(
                tonic::Request::new(()),
                PathAndQuery::from_static("/test.Echo/Call"),
                ProstCodec::<(), ()>::default(),
            )
            .await?;
        Ok(answer
            .metadata()
            .get("x-server")
            .expect("the answering server")
            .to_str()
            .expect("port")
            .parse()
            .expect("port"))
    }

    #[tokio::test]
    async fn a_tonic_clients_calls_are_spread_over_every_address_of_the_name() {
        let (a, _a) = echo_server().await;
        let (b, _b) = echo_server().await;
        let resolver = Arc::new(Moving(Mutex::new(vec![a, b])));
        let upstream = Upstream::with(
            &ClientTls::default(),
            "http://profiles.test:50052",
            Timing::default(),
            resolver,
        )
        .expect("upstream");
        let mut client = Grpc::new(upstream);
        let mut answered = Vec::new();
        // Idle addresses are chosen at random: 32 calls all on one would
        // happen once in two billion runs.
        for _ in 0..32 {
            answered.push(echo(&mut client).await.expect("call"));
        }
        answered.sort_unstable();
        answered.dedup();
        let mut expected = vec![a.port(), b.port()];
        expected.sort_unstable();
        assert_eq!(answered, expected);
    }

    #[tokio::test]
    async fn a_tonic_clients_deadline_ends_its_wait_for_a_stalled_upstream() {
        // An upstream that takes calls and never answers them.
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr = listener.local_addr().expect("addr");
        tokio::spawn(async move {
            let (tcp, _) = listener.accept().await.expect("accept");
            let mut connection = h2::server::handshake(tcp).await.expect("handshake");
            let mut unanswered = Vec::new();
            while let Some(Ok(call)) = connection.accept().await {
                unanswered.push(call);
            }
        });
        let upstream =
            Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream");
        let mut client = Grpc::new(upstream);
        client.ready().await.expect("ready");
        let mut request = tonic::Request::new(());
        request.set_timeout(Duration::from_millis(200));
        let waited = tokio::time::timeout(
            Duration::from_secs(5),
            client.unary(
                request,
                PathAndQuery::from_static("/test.Echo/Call"),
                ProstCodec::<(), ()>::default(),
            ),
        )
        .await
        .expect("the deadline ends the wait");
        assert_eq!(
            waited.expect_err("no answer").code(),
            Code::DeadlineExceeded
        );
    }

    #[test]
    fn grpc_timeouts_parse_per_the_protocol() {
        assert_eq!(parse_grpc_timeout("100m"), Some(Duration::from_millis(100)));
        assert_eq!(parse_grpc_timeout("5S"), Some(Duration::from_secs(5)));
        assert_eq!(parse_grpc_timeout("1H"), Some(Duration::from_secs(3600)));
        assert_eq!(
            parse_grpc_timeout("99999999n"),
            Some(Duration::from_nanos(99_999_999))
        );
        for bad in ["", "m", "5", "5x", "-5S", "123456789S", "1.5S"] {
            assert_eq!(parse_grpc_timeout(bad), None, "{bad}");
        }
    }

    #[tokio::test]
    async fn a_tonic_client_hears_unavailable_without_the_address_when_nothing_answers() {
        let listener = TcpListener::bind("127.0.0.1:0").await.expect("bind");
        let addr: SocketAddr = listener.local_addr().expect("addr");
        drop(listener);
        let upstream =
            Upstream::new(&ClientTls::default(), &format!("http://{addr}")).expect("upstream");
        let mut client = Grpc::new(upstream);
        let refused = echo(&mut client).await.expect_err("nothing listens");
        assert_eq!(refused.code(), Code::Unavailable);
        assert_eq!(refused.message(), format!("{addr} is unavailable"));
        assert!(!refused.message().contains("refused"));
    }
}
