//! One address of an upstream and its HTTP/2 connection: opened on first
//! use, kept alive with pings, and opened again after it closes.

use std::net::SocketAddr;
use std::sync::atomic::{AtomicU32, AtomicU64, AtomicUsize, Ordering};
use std::sync::{Arc, Mutex, PoisonError, Weak};

use bytes::Bytes;
use h2::client::{Connection, SendRequest};
use h2::{RecvStream, SendStream};
use tokio::io::{AsyncRead, AsyncWrite};
use tokio::net::TcpStream;

use super::{Origin, Timing, UpstreamError};

/// The windows hyper's HTTP/2 client opens with (a tonic channel's
/// defaults), rather than the protocol's 64 KiB: a streamed export would
/// otherwise wait on window updates every few pages.
const STREAM_WINDOW: u32 = 2 * 1024 * 1024;
const CONNECTION_WINDOW: u32 = 5 * 1024 * 1024;

/// One address an upstream's name resolved to (a pod, behind a headless
/// Service), with its connection and the calls it is carrying.
pub(super) struct Endpoint {
    pub(super) address: SocketAddr,
    /// Calls sent to this address whose response has not begun: the work
    /// waiting on it (as tower's `PendingRequests` counts). A response that
    /// has begun no longer counts, so a change stream open for hours is
    /// not load.
    waiting: AtomicUsize,
    /// Failed attempts to connect in a row. While there are any the address
    /// is in transient failure, as gRPC names it: passed over for the
    /// others, the calls that still come to it (when every address picked
    /// is failing) answered its last failure at once, and a task of its own
    /// ([`reconnect`]) trying again after a backoff that grows with them.
    failures: AtomicU32,
    /// The open connection's sender, with the number of the connection it
    /// belongs to, so a closed connection clears only itself.
    current: Mutex<Option<(u64, SendRequest<Bytes>)>>,
    /// Connection attempts so far; an attempt's number names its
    /// connection.
    attempts: AtomicU64,
    /// Held while connecting, so concurrent calls open one connection; it
    /// keeps the last attempt's failure, which the calls that waited on that
    /// attempt, or come while the address is failing, share instead of each
    /// trying again in turn.
    connecting: tokio::sync::Mutex<Option<Arc<UpstreamError>>>,
    /// The streams of calls that ended (all of them closed both ways), let
    /// go once the next call on this address has written its request, at
    /// the connection's next ping, or with the endpoint, rather than where
    /// they ended. Why: h2 wakes the connection's task when a closed
    /// stream's last handle goes, and where a response ends, that poll
    /// also wakes the caller's connection to send it; two tasks woken in
    /// one poll make tokio wake a second, idle worker thread, a futex round
    /// trip per call for work the first thread then does itself
    /// (docs/BENCHMARKS.md, session 21). After the next call's request,
    /// the connection's task has been woken already and nothing is.
    ended: Mutex<Vec<EndedStream>>,
}

/// The handles of an ended call's stream: the response's, and the
/// request's when the call's own task still held it.
pub(super) struct EndedStream {
    _recv: RecvStream,
    _send: Option<SendStream<Bytes>>,
}

/// Counts a call against its endpoint until its response begins, and
/// then keeps the endpoint for the call's ended stream.
pub(super) struct Load {
    endpoint: Arc<Endpoint>,
    waiting: bool,
}

impl Load {
    pub(super) fn new(endpoint: &Arc<Endpoint>) -> Load {
        endpoint.waiting.fetch_add(1, Ordering::Relaxed);
        Load {
            endpoint: Arc::clone(endpoint),
            waiting: true,
        }
    }

    /// The response has begun: the call no longer counts against its
    /// endpoint.
    pub(super) fn answered(&mut self) {
        if std::mem::take(&mut self.waiting) {
            self.endpoint.waiting.fetch_sub(1, Ordering::Relaxed);
        }
    }

    pub(super) fn endpoint(&self) -> &Arc<Endpoint> {
        &self.endpoint
    }

    /// Lets go of the streams of the calls that ended on this endpoint.
    pub(super) fn release_ended(&self) {
        self.endpoint.release_ended();
    }

    /// Hands the stream of a call that ended to its endpoint, to be let go
    /// later (see [`Endpoint::ended`]).
    pub(super) fn keep_ended(&self, recv: RecvStream, send: Option<SendStream<Bytes>>) {
        self.endpoint.keep_ended(recv, send);
    }
}

impl Drop for Load {
    fn drop(&mut self) {
        self.answered();
    }
}

impl Endpoint {
    pub(super) fn new(address: SocketAddr) -> Arc<Endpoint> {
        Arc::new(Endpoint {
            address,
            waiting: AtomicUsize::new(0),
            failures: AtomicU32::new(0),
            current: Mutex::new(None),
            attempts: AtomicU64::new(0),
            connecting: tokio::sync::Mutex::new(None),
            ended: Mutex::new(Vec::new()),
        })
    }

    fn keep_ended(&self, recv: RecvStream, send: Option<SendStream<Bytes>>) {
        // A call that outlived its connection: no later call on that
        // connection will let it go, and nothing is left to wake.
        if !self.has_connection() {
            return;
        }
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .push(EndedStream {
                _recv: recv,
                _send: send,
            });
    }

    /// Lets go of the streams of the calls that ended since the last time.
    pub(super) fn release_ended(&self) {
        let ended = std::mem::take(&mut *self.ended.lock().unwrap_or_else(PoisonError::into_inner));
        // Outside the lock: each drop takes h2's own lock and may wake the
        // connection's task.
        drop(ended);
    }

    #[cfg(test)]
    pub(super) fn connection_attempts(&self) -> u64 {
        self.attempts.load(Ordering::Acquire)
    }

    #[cfg(test)]
    pub(super) fn ended_count(&self) -> usize {
        self.ended
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .len()
    }

    /// How busy the endpoint is, for choosing between two: one failing to
    /// connect comes after every one that is not, then fewer calls waiting
    /// for their response first.
    pub(super) fn load(&self) -> (bool, usize) {
        (self.failing(), self.waiting.load(Ordering::Relaxed))
    }

    fn failing(&self) -> bool {
        self.failures.load(Ordering::Relaxed) > 0
    }

    /// Marks the endpoint as failing to connect, or not.
    #[cfg(test)]
    pub(super) fn set_failing(&self, failing: bool) {
        self.failures.store(u32::from(failing), Ordering::Relaxed);
    }

    /// A sender ready for one more stream, with the number of its
    /// connection: the open connection's, or a new connection's when there
    /// is none or it has closed.
    pub(super) async fn ready_sender(
        self: &Arc<Self>,
        origin: &Arc<Origin>,
    ) -> Result<(u64, SendRequest<Bytes>), UpstreamError> {
        if let Some((number, sender)) = self.open() {
            match sender.ready().await {
                Ok(sender) => return Ok((number, sender)),
                Err(err) => {
                    tracing::debug!(error = %err, "upstream connection closed; reconnecting");
                    self.forget(number);
                }
            }
        }
        let (number, sender) = self.connect(origin).await?;
        match sender.ready().await {
            Ok(sender) => Ok((number, sender)),
            Err(err) => {
                self.forget(number);
                Err(err.into())
            }
        }
    }

    /// A new connection, or the failure every call that waited on the
    /// attempt shares; an address already failing answers its last failure
    /// at once, and its own task tries again.
    async fn connect(
        self: &Arc<Self>,
        origin: &Arc<Origin>,
    ) -> Result<(u64, SendRequest<Bytes>), UpstreamError> {
        let mut last_failure = self.connecting.lock().await;
        // Another call may have connected, or failed to, while this one
        // waited.
        if let Some(open) = self.open() {
            return Ok(open);
        }
        // A last failure means the address is failing (both change under
        // this lock). Why it answers at once: a pod gone from under its
        // address (a Service scaled to zero keeps its last addresses) can
        // take the whole connect timeout to fail, and every call would wait
        // that long in turn.
        if let Some(failure) = last_failure.as_ref() {
            return Err(UpstreamError::Shared(Arc::clone(failure)));
        }
        let connected = self.attempt(origin, &mut last_failure).await;
        if connected.is_err() {
            tokio::spawn(reconnect(Arc::downgrade(self), Arc::clone(origin)));
        }
        connected
    }

    /// One attempt to connect, under the `connecting` lock (`last_failure`).
    async fn attempt(
        self: &Arc<Self>,
        origin: &Origin,
        last_failure: &mut Option<Arc<UpstreamError>>,
    ) -> Result<(u64, SendRequest<Bytes>), UpstreamError> {
        // The attempt's number names the connection it opens.
        let number = self.attempts.fetch_add(1, Ordering::Relaxed) + 1;
        let timing = origin.timing;
        let opened = tokio::time::timeout(timing.connect, origin.open(self.address))
            .await
            .unwrap_or_else(|_| {
                Err(UpstreamError::ConnectTimedOut {
                    address: self.address.to_string(),
                    timeout: timing.connect,
                })
            });
        let (sender, connection) = match opened {
            Ok(opened) => opened,
            Err(err) => {
                self.failures.fetch_add(1, Ordering::Relaxed);
                let err = Arc::new(err);
                *last_failure = Some(Arc::clone(&err));
                return Err(UpstreamError::Shared(err));
            }
        };
        *last_failure = None;
        *self.current.lock().unwrap_or_else(PoisonError::into_inner) =
            Some((number, sender.clone()));
        self.failures.store(0, Ordering::Relaxed);
        tokio::spawn(drive(connection, Arc::downgrade(self), number, timing));
        Ok((number, sender))
    }

    /// Whether a connection is open, without taking a handle on it (a
    /// clone of h2's sender takes the connection's lock).
    pub(super) fn has_connection(&self) -> bool {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .is_some()
    }

    fn open(&self) -> Option<(u64, SendRequest<Bytes>)> {
        self.current
            .lock()
            .unwrap_or_else(PoisonError::into_inner)
            .clone()
    }

    /// Stops handing out connection `number` to new calls (it closed, or
    /// the upstream said it is going away); calls already on it go on.
    pub(super) fn forget(&self, number: u64) {
        let mut current = self.current.lock().unwrap_or_else(PoisonError::into_inner);
        if current.as_ref().is_some_and(|(open, _)| *open == number) {
            *current = None;
        }
    }
}

/// Tries a failing endpoint again after each backoff until it connects,
/// or until it is dropped from its upstream's addresses, so that it takes
/// calls again as soon as it answers rather than when a call next tries it.
async fn reconnect(endpoint: Weak<Endpoint>, origin: Arc<Origin>) {
    loop {
        let Some(failures) = endpoint
            .upgrade()
            .map(|e| e.failures.load(Ordering::Relaxed))
        else {
            return;
        };
        if failures == 0 {
            return;
        }
        tokio::time::sleep(origin.timing.backoff(failures)).await;
        let Some(endpoint) = endpoint.upgrade() else {
            return;
        };
        let mut last_failure = endpoint.connecting.lock().await;
        if last_failure.is_none() {
            return;
        }
        if let Err(err) = endpoint.attempt(&origin, &mut last_failure).await {
            tracing::debug!(address = %endpoint.address, error = %err, "an upstream address is still unreachable");
        }
    }
}

/// Drives a connection, pinging it while it is idle or busy alike, until it
/// ends or a ping goes unanswered; then the next call opens another. An
/// endpoint dropped from its upstream's addresses lets go of its sender, and
/// the connection ends once its last call has.
async fn drive(
    mut connection: Connection<BoxedIo, Bytes>,
    endpoint: Weak<Endpoint>,
    number: u64,
    timing: Timing,
) {
    let ping_pong = connection.ping_pong();
    let pinged = endpoint.clone();
    let keepalive = async move {
        let Some(mut ping_pong) = ping_pong else {
            return std::future::pending().await;
        };
        loop {
            tokio::time::sleep(timing.ping_interval).await;
            // Every ping lets ended streams go too, so an address that
            // takes no more calls does not hold them.
            if let Some(endpoint) = pinged.upgrade() {
                endpoint.release_ended();
            }
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
    if let Some(endpoint) = endpoint.upgrade() {
        endpoint.forget(number);
        // No later call may come to let them go.
        endpoint.release_ended();
    }
}

impl Origin {
    /// A new HTTP/2 connection to one of the origin's addresses, plain or
    /// TLS (the certificate checked against the origin's name).
    async fn open(
        &self,
        address: SocketAddr,
    ) -> Result<(SendRequest<Bytes>, Connection<BoxedIo, Bytes>), UpstreamError> {
        let tcp = TcpStream::connect(address)
            .await
            .map_err(|source| UpstreamError::Connect {
                address: address.to_string(),
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
                        address: address.to_string(),
                        source,
                    })?;
                if tls.get_ref().1.alpn_protocol() != Some(b"h2") {
                    return Err(UpstreamError::NotHttp2 {
                        address: address.to_string(),
                    });
                }
                Box::new(tls)
            }
        };
        let mut builder = h2::client::Builder::new();
        builder
            .initial_window_size(STREAM_WINDOW)
            .initial_connection_window_size(CONNECTION_WINDOW)
            .enable_push(false);
        #[cfg(test)]
        builder.initial_stream_id(self.timing.first_stream_id);
        builder
            .handshake(io)
            .await
            .map_err(|source| UpstreamError::Http2Handshake {
                address: address.to_string(),
                source,
            })
    }
}

/// A connection's transport, plain or TLS: one type, so one connection
/// driver.
trait Io: AsyncRead + AsyncWrite + Unpin + Send {}
impl<T: AsyncRead + AsyncWrite + Unpin + Send> Io for T {}
type BoxedIo = Box<dyn Io>;
