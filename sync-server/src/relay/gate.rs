//! Who may hold a connection, and for how long a request body may take: a global and a
//! per-address cap on open connections, the answer to connections over them, and body deadlines.

use super::*;
use axum::body::Bytes;
use http_body::{Body as HttpBody, Frame, SizeHint};
use std::net::IpAddr;
use std::pin::Pin;
use std::task::{Context, Poll};

/// Open connections: at most `max_total` in all, at most `max_per_address` from one address (IPv6:
/// one /64). Trusted reverse proxies count only towards the total (behind one, every customer and
/// agent arrives from its address).
pub(crate) struct Gate {
    max_total: usize,
    max_per_address: usize,
    trusted: Vec<crate::widget::Cidr>,
    open: Mutex<Open>,
}

#[derive(Default)]
struct Open {
    total: usize,
    by_address: HashMap<IpAddr, usize>,
    /// Connections over a cap that are being told so (see `MAX_TURNED_AWAY`).
    turned_away: usize,
}

/// Connections over a cap still served for a moment (to answer `/health` and say why everything
/// else is refused); beyond these, the accept loop answers 503 at once without reading anything.
const MAX_TURNED_AWAY: usize = 256;

/// An open connection's place under the caps, freed when the last holder (the HTTP connection, or
/// the WebSocket it became) drops it.
pub(crate) struct Permit {
    gate: Arc<Gate>,
    address: Option<IpAddr>,
}

/// A connection over a cap: served only to answer `/health` and to say why.
pub(crate) struct TurnedAway {
    gate: Arc<Gate>,
}

/// Why a connection over a cap was refused (in the 503's body and the close frame's reason).
#[derive(Clone)]
pub(crate) struct Busy(pub(crate) String);

pub(crate) enum Admission {
    Admitted(Arc<Permit>),
    /// Over a cap: answer with the reason.
    Busy(TurnedAway, Busy),
    /// Over a cap, and too many are already being told: answered at once and closed.
    Refused(Busy),
}

impl Gate {
    pub(crate) fn new(config: &Config) -> Arc<Gate> {
        Arc::new(Gate {
            max_total: config.max_connections,
            max_per_address: config.max_connections_per_address,
            trusted: config.trusted_proxies.clone(),
            open: Mutex::default(),
        })
    }

    pub(crate) fn admit(self: &Arc<Gate>, peer: IpAddr) -> Admission {
        let address = (!self.trusted.iter().any(|c| c.contains(peer))).then(|| crate::widget::net::counted(peer));
        let mut open = self.open.lock().unwrap_or_else(|p| p.into_inner());
        let from_address = address.and_then(|a| open.by_address.get(&a).copied()).unwrap_or(0);
        let busy = if open.total >= self.max_total {
            Some(format!(
                "the relay is at its limit of {} open connections; try again in a few seconds",
                self.max_total
            ))
        } else if address.is_some() && from_address >= self.max_per_address {
            Some(format!(
                "your address has {} connections open, the most one address may; close some or try again later",
                self.max_per_address
            ))
        } else {
            None
        };
        match busy {
            None => {
                open.total += 1;
                if let Some(a) = address {
                    *open.by_address.entry(a).or_default() += 1;
                }
                Admission::Admitted(Arc::new(Permit { gate: self.clone(), address }))
            }
            Some(reason) if open.turned_away < MAX_TURNED_AWAY => {
                open.turned_away += 1;
                Admission::Busy(TurnedAway { gate: self.clone() }, Busy(reason))
            }
            Some(reason) => Admission::Refused(Busy(reason)),
        }
    }

    /// Open connections under the caps.
    pub(crate) fn open(&self) -> usize {
        self.open.lock().unwrap_or_else(|p| p.into_inner()).total
    }
}

impl Drop for Permit {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.total = open.total.saturating_sub(1);
        if let Some(a) = self.address
            && let Some(n) = open.by_address.get_mut(&a)
        {
            *n -= 1;
            if *n == 0 {
                open.by_address.remove(&a);
            }
        }
    }
}

impl Drop for TurnedAway {
    fn drop(&mut self) {
        let mut open = self.gate.open.lock().unwrap_or_else(|p| p.into_inner());
        open.turned_away = open.turned_away.saturating_sub(1);
    }
}

/// Keeps a connection's permit for as long as a WebSocket it became stays open.
#[derive(Clone)]
pub(crate) struct Held(#[allow(dead_code)] pub(crate) Arc<Permit>);

/// The whole answer to a connection over the caps when nothing of it is read: written if the
/// socket takes it at once, then the connection is closed.
pub(crate) fn refuse_at_once(tcp: tokio::net::TcpStream, busy: &Busy) {
    let body = &busy.0;
    let answer = format!(
        "HTTP/1.1 503 Service Unavailable\r\nretry-after: 5\r\ncontent-type: text/plain; charset=utf-8\r\ncontent-length: {}\r\nconnection: close\r\n\r\n{body}",
        body.len()
    );
    let _ = tcp.try_write(answer.as_bytes());
}

/// What a connection over a cap gets for anything but `/health`: 503 with the reason, or for a
/// WebSocket upgrade, close 1013 ("try again later") with the reason.
pub(crate) async fn busy(
    axum::Extension(Busy(reason)): axum::Extension<Busy>,
    ws: Result<WebSocketUpgrade, axum::extract::ws::rejection::WebSocketUpgradeRejection>,
) -> Response {
    match ws {
        Ok(ws) => ws.on_upgrade(move |mut socket| async move {
            let reason: String = reason.chars().take(120).collect();
            let _ = socket.send(Message::Close(Some(CloseFrame { code: 1013, reason: reason.into() }))).await;
        }),
        Err(e) => {
            debug!(%e, "not a WebSocket upgrade");
            (StatusCode::SERVICE_UNAVAILABLE, [(axum::http::header::RETRY_AFTER, "5")], reason).into_response()
        }
    }
}

/// A request body that must arrive at `min_rate` bytes a second after a grace period: by `grace +
/// n / min_rate` after the request, `n` bytes must have come, else the body ends in an error (a
/// client trickling a large body cannot hold its connection for long).
pub(crate) struct TimedBody {
    inner: hyper::body::Incoming,
    started: tokio::time::Instant,
    received: u64,
    grace: std::time::Duration,
    min_rate: u64,
    deadline: Pin<Box<tokio::time::Sleep>>,
}

/// Body pieces smaller than this are copied (see `TimedBody::poll_frame`).
const SMALL_PIECE: usize = 1024;

/// The error a body too slow to arrive ends with; `read_body` answers it with 408.
#[derive(Debug, thiserror::Error)]
#[error("the request body came too slowly (at least {0} bytes a second are needed)")]
pub(crate) struct TooSlow(u64);

impl TimedBody {
    pub(crate) fn new(inner: hyper::body::Incoming, grace: std::time::Duration, min_rate: u64) -> TimedBody {
        let started = tokio::time::Instant::now();
        TimedBody {
            inner,
            started,
            received: 0,
            grace,
            min_rate: min_rate.max(1),
            deadline: Box::pin(tokio::time::sleep_until(started + grace)),
        }
    }
}

impl HttpBody for TimedBody {
    type Data = Bytes;
    type Error = axum::BoxError;

    fn poll_frame(mut self: Pin<&mut Self>, cx: &mut Context<'_>) -> Poll<Option<Result<Frame<Bytes>, Self::Error>>> {
        let this = &mut *self;
        match Pin::new(&mut this.inner).poll_frame(cx) {
            Poll::Ready(Some(Ok(frame))) => {
                let frame = match frame.into_data() {
                    Ok(data) => {
                        this.received += data.len() as u64;
                        let allowed = this.grace
                            + std::time::Duration::from_secs_f64(this.received as f64 / this.min_rate as f64);
                        this.deadline.as_mut().reset(this.started + allowed);
                        // A small piece is copied out of the connection's read buffer: kept as it
                        // is, each one would hold that whole buffer until the body is complete (a
                        // body trickled a byte at a time held about 200 KiB per connection).
                        match data.len() < SMALL_PIECE {
                            true => Frame::data(Bytes::copy_from_slice(&data)),
                            false => Frame::data(data),
                        }
                    }
                    Err(frame) => frame,
                };
                Poll::Ready(Some(Ok(frame)))
            }
            Poll::Ready(Some(Err(e))) => Poll::Ready(Some(Err(e.into()))),
            Poll::Ready(None) => Poll::Ready(None),
            Poll::Pending => match this.deadline.as_mut().poll(cx) {
                Poll::Ready(()) => Poll::Ready(Some(Err(TooSlow(this.min_rate).into()))),
                Poll::Pending => Poll::Pending,
            },
        }
    }

    fn is_end_stream(&self) -> bool {
        self.inner.is_end_stream()
    }

    fn size_hint(&self) -> SizeHint {
        self.inner.size_hint()
    }
}

/// Reads a whole request body of at most `limit` bytes, after the caller has decided who is
/// sending it. Too large: 413; too slow: 408; broken off: 400 (each with what to tell the client,
/// in the route's own format).
pub(crate) async fn read_body(body: axum::body::Body, limit: usize) -> Result<Bytes, (StatusCode, String)> {
    match axum::body::to_bytes(body, limit).await {
        Ok(bytes) => Ok(bytes),
        Err(e) => {
            let mut source: Option<&(dyn std::error::Error + 'static)> = Some(&e);
            while let Some(err) = source {
                if let Some(slow) = err.downcast_ref::<TooSlow>() {
                    return Err((StatusCode::REQUEST_TIMEOUT, slow.to_string()));
                }
                if err.downcast_ref::<http_body_util::LengthLimitError>().is_some() {
                    return Err((
                        StatusCode::PAYLOAD_TOO_LARGE,
                        format!("the request body is over the limit of {limit} bytes"),
                    ));
                }
                source = err.source();
            }
            Err((StatusCode::BAD_REQUEST, "the request body was broken off".into()))
        }
    }
}

/// Answers a connection over the caps (`/health` still works) and closes it.
pub(crate) async fn turn_away(
    tcp: tokio::net::TcpStream,
    remote: std::net::SocketAddr,
    busy_app: Router,
    why: Busy,
    guard: TurnedAway,
) {
    use tower::Service;
    debug!(%remote, reason = %why.0, "connection over a cap");
    let service = hyper::service::service_fn(move |mut request: hyper::Request<hyper::body::Incoming>| {
        request.extensions_mut().insert(why.clone());
        busy_app.clone().call(request)
    });
    let mut builder = hyper::server::conn::http1::Builder::new();
    // (Not `keep_alive(false)`: its `connection: close` would spoil the answer to an upgrade.)
    builder.timer(hyper_util::rt::TokioTimer::new()).header_read_timeout(std::time::Duration::from_secs(2));
    let connection = builder.serve_connection(hyper_util::rt::TokioIo::new(tcp), service).with_upgrades();
    // A few requests at most: the connection is closed after 5 s whatever it does.
    let _ = tokio::time::timeout(std::time::Duration::from_secs(5), connection).await;
    drop(guard);
}
