//! The frames of one Realtime connection, both ways, metered per response.
//!
//! Four tasks' worth of work in one spawned task: a reader and a writer per side, joined by
//! bounded channels. A reader waits for the other side's writer to take each message, so a slow
//! reader on one side slows the other side's sender down (TCP backpressure), and what one
//! connection holds is bounded: tungstenite's buffers, at most [`QUEUE`] messages per direction,
//! each at most the side's message limit.
//!
//! Metering, per response (`docs/realtime.md`):
//!
//! - a client's `response.create` reserves its ceiling (after the cap; else the session's
//!   ceiling as the server reported it; else `budget.default_reserve_tokens`) at every budget
//!   scope before it is forwarded. One the budget cannot cover is not forwarded: the client gets
//!   an `error` event with code `budget_exhausted`.
//! - a response the server starts by itself (voice activity detection) is reserved when its
//!   `response.created` arrives; if the budget cannot cover it, the proxy cancels it upstream
//!   (`response.cancel`) and tells the client, and its `response.done` still charges what it
//!   used (nothing reserved, so the bucket may go into debt).
//! - `response.done` settles the response's reservation on its `usage`; an upstream `error`
//!   about a `response.create` gives its reservation back. Reservations still open when the
//!   connection ends stand.
//!
//! The connection ends, with close code 1008 and a reason for the client, when the session's
//! token expires, when it is revoked (checked every [`REVOCATION_CHECK`]), or after
//! `realtime.max_duration_secs`; and when either side closes (its close frame is passed on).

use std::collections::VecDeque;
use std::net::IpAddr;
use std::sync::{Arc, Mutex};
use std::time::Duration;

use bytes::Bytes;
use futures_util::{SinkExt, StreamExt};
use hyper_util::rt::TokioIo;
use tokio::sync::mpsc;
use tokio_tungstenite::WebSocketStream;
use tokio_tungstenite::tungstenite::protocol::frame::coding::CloseCode;
use tokio_tungstenite::tungstenite::protocol::{CloseFrame, Role, WebSocketConfig};
use tokio_tungstenite::tungstenite::{Message, Utf8Bytes};

use super::Realtime;
use super::events::{self, Ceiling, ClientEvent, ServerEvent};
use crate::body::KeyMask;
use crate::budget::Admitted;
use crate::clock::unix_now;
use crate::error::{Error, ErrorCode};
use crate::store::{Set, log_failure};
use crate::token::VerifiedSession;

/// How often an open connection checks that its session was not revoked: the longest a
/// revoked session's connection stays open.
const REVOCATION_CHECK: Duration = Duration::from_secs(2);

/// Messages queued per direction between a reader and the other side's writer.
const QUEUE: usize = 4;

/// Most bytes of one upstream message (audio deltas are a few KiB; a whole session's
/// configuration, with its tools and instructions, well under this).
const MAX_UPSTREAM_MESSAGE: usize = 16 << 20;

/// How long the closing handshakes may take once the connection ends.
const CLOSING: Duration = Duration::from_secs(2);

type Socket = WebSocketStream<TokioIo<hyper::upgrade::Upgraded>>;

/// One connection's relay.
pub(super) struct Relay {
    pub(super) realtime: Arc<Realtime>,
    pub(super) session: VerifiedSession,
    pub(super) ip: Option<IpAddr>,
    pub(super) beta: bool,
    /// The connection slot to give back at the end.
    pub(super) slot: String,
}

/// The reservations of a connection's responses.
#[derive(Default)]
struct Ledger {
    /// In the order they were made.
    open: VecDeque<Open>,
    /// The session's ceiling, from the server's `session.created` / `session.updated`.
    session_ceiling: Option<Ceiling>,
}

struct Open {
    /// The client event that asked for it (`None`: the server started the response).
    event_id: Option<String>,
    /// The response's id, once the server named it.
    response_id: Option<String>,
    admitted: Admitted,
}

impl Relay {
    /// Runs the connection to its end, then settles and frees what it held.
    pub(super) async fn run(
        self,
        client: hyper::upgrade::OnUpgrade,
        upstream: hyper::upgrade::OnUpgrade,
    ) {
        let (client, upstream) = match tokio::try_join!(client, upstream) {
            Ok(both) => both,
            Err(e) => {
                tracing::debug!(error = %e, "a Realtime upgrade failed");
                self.realtime.free_slot(self.slot);
                return;
            }
        };
        let client_config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(0)
            .max_write_buffer_size(MAX_UPSTREAM_MESSAGE + (64 << 10))
            .max_message_size(Some(self.realtime.max_client_message))
            .max_frame_size(Some(self.realtime.max_client_message));
        let upstream_config = WebSocketConfig::default()
            .read_buffer_size(8 << 10)
            .write_buffer_size(0)
            .max_write_buffer_size(self.realtime.max_client_message + (64 << 10))
            .max_message_size(Some(MAX_UPSTREAM_MESSAGE))
            .max_frame_size(Some(MAX_UPSTREAM_MESSAGE));
        let client = WebSocketStream::from_raw_socket(
            TokioIo::new(client),
            Role::Server,
            Some(client_config),
        )
        .await;
        let upstream = WebSocketStream::from_raw_socket(
            TokioIo::new(upstream),
            Role::Client,
            Some(upstream_config),
        )
        .await;
        metrics::gauge!("perishable_realtime_connections").increment(1.0);
        let ledger = Arc::new(Mutex::new(Ledger::default()));
        let reason = self.relay(client, upstream, &ledger).await;
        metrics::gauge!("perishable_realtime_connections").decrement(1.0);
        metrics::counter!("perishable_realtime_closed_total", "reason" => reason).increment(1);
        tracing::info!(
            session_id = self.session.session_id(),
            reason,
            "realtime connection closed"
        );
        // What is still open stands: the upstream may have spent it.
        let open = std::mem::take(&mut lock(&ledger).open);
        for open in open {
            if open.admitted.reserved() > 0 {
                metrics::counter!("perishable_usage_unread_total").increment(1);
            }
            self.realtime.budget.settle(open.admitted, None, false);
        }
        self.realtime.free_slot(self.slot);
    }

    /// Relays until one side ends or the session's time is up; returns why it ended.
    async fn relay(
        &self,
        client: Socket,
        upstream: Socket,
        ledger: &Arc<Mutex<Ledger>>,
    ) -> &'static str {
        let (client_sink, client_stream) = client.split();
        let (upstream_sink, upstream_stream) = upstream.split();
        let (to_client, client_queue) = mpsc::channel::<Message>(QUEUE);
        let (to_upstream, upstream_queue) = mpsc::channel::<Message>(QUEUE);
        let writers = tokio::spawn(async move {
            tokio::join!(
                write(client_sink, client_queue),
                write(upstream_sink, upstream_queue)
            );
        });

        let reason = tokio::select! {
            reason = self.client_to_upstream(client_stream, &to_upstream, &to_client, ledger) => reason,
            reason = self.upstream_to_client(upstream_stream, &to_upstream, &to_client, ledger) => reason,
            reason = self.lifetime() => {
                let close = |code, reason: &'static str| {
                    Message::Close(Some(CloseFrame { code, reason: Utf8Bytes::from_static(reason) }))
                };
                let _ = to_client.try_send(close(CloseCode::Policy, reason));
                let _ = to_upstream.try_send(close(CloseCode::Normal, "client session ended"));
                reason
            }
        };
        drop((to_client, to_upstream));
        // The writers send what is queued (the close frames included), then close.
        if tokio::time::timeout(CLOSING, writers).await.is_err() {
            tracing::debug!("a Realtime connection did not close in time");
        }
        reason
    }

    /// The client's frames, to the upstream.
    async fn client_to_upstream(
        &self,
        mut stream: futures_util::stream::SplitStream<Socket>,
        to_upstream: &mpsc::Sender<Message>,
        to_client: &mpsc::Sender<Message>,
        ledger: &Mutex<Ledger>,
    ) -> &'static str {
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                // Over `upstream.max_body_bytes`: 1009 (RFC 6455 section 7.4.1), and the
                // upstream is closed normally.
                Err(tokio_tungstenite::tungstenite::Error::Capacity(_)) => {
                    let close = |code, reason: &'static str| {
                        Message::Close(Some(CloseFrame {
                            code,
                            reason: Utf8Bytes::from_static(reason),
                        }))
                    };
                    let _ = to_client.try_send(close(
                        CloseCode::Size,
                        "message too big (upstream.max_body_bytes)",
                    ));
                    let _ = to_upstream.try_send(close(CloseCode::Normal, "client session ended"));
                    return "client message too big";
                }
                Err(e) => {
                    tracing::debug!(error = %e, "the Realtime client's connection failed");
                    return "client error";
                }
            };
            let forward = match message {
                Message::Text(text) => match self.client_text(text, ledger).await {
                    Ok(forward) => forward,
                    Err((error, about)) => {
                        let event = events::error_event(&error, about.as_deref());
                        if to_client.send(Message::text(event)).await.is_err() {
                            return "client gone";
                        }
                        continue;
                    }
                },
                Message::Binary(_) => {
                    let error = Error::new(
                        ErrorCode::InvalidJson,
                        "binary frames cannot be metered: send events as JSON text frames",
                    );
                    let event = events::error_event(&error, None);
                    if to_client.send(Message::text(event)).await.is_err() {
                        return "client gone";
                    }
                    continue;
                }
                Message::Close(frame) => {
                    let _ = to_upstream.send(Message::Close(frame)).await;
                    return "client closed";
                }
                other @ (Message::Ping(_) | Message::Pong(_)) => other,
                Message::Frame(_) => continue,
            };
            if to_upstream.send(forward).await.is_err() {
                return "upstream gone";
            }
        }
        "client gone"
    }

    /// A client's text frame: what to forward, or the refusal to send back (with the client
    /// event it is about).
    async fn client_text(
        &self,
        text: Utf8Bytes,
        ledger: &Mutex<Ledger>,
    ) -> Result<Message, (Error, Option<String>)> {
        let frame = Bytes::from(text);
        let r = &self.realtime;
        match events::read_client(&frame, self.cap(), &r.allowed_models, self.beta) {
            Err(error) => Err((error, None)),
            Ok(ClientEvent::Forward) => Ok(text_message(frame)),
            Ok(ClientEvent::Create {
                ceiling,
                event_id,
                body,
            }) => {
                let session_ceiling = lock(ledger).session_ceiling;
                let amount = self.reserve_amount(ceiling, session_ceiling);
                match r
                    .budget
                    .admit(Some(&self.session), self.ip, false, amount)
                    .await
                {
                    Ok(admitted) => {
                        lock(ledger).open.push_back(Open {
                            event_id,
                            response_id: None,
                            admitted,
                        });
                        Ok(text_message(body))
                    }
                    Err(error) => Err((error, event_id)),
                }
            }
        }
    }

    /// The session's completion cap (its tier's, else `budget.max_completion_tokens`; 0: none).
    fn cap(&self) -> u64 {
        self.realtime.cap_for(self.session.claims.tier.as_deref())
    }

    /// Tokens to reserve for a response with `ceiling`.
    fn reserve_amount(&self, ceiling: Ceiling, session: Option<Ceiling>) -> u64 {
        let r = &self.realtime;
        let cap = self.cap();
        let fallback = if cap > 0 {
            cap.min(r.default_reserve)
        } else {
            r.default_reserve
        };
        match ceiling {
            Ceiling::Tokens(n) => n,
            Ceiling::Infinite => fallback,
            Ceiling::Unset => match session {
                Some(Ceiling::Tokens(n)) if cap == 0 || n <= cap => n,
                _ => fallback,
            },
        }
    }

    /// The upstream's frames, to the client.
    async fn upstream_to_client(
        &self,
        mut stream: futures_util::stream::SplitStream<Socket>,
        to_upstream: &mpsc::Sender<Message>,
        to_client: &mpsc::Sender<Message>,
        ledger: &Mutex<Ledger>,
    ) -> &'static str {
        while let Some(message) = stream.next().await {
            let message = match message {
                Ok(message) => message,
                Err(e) => {
                    tracing::debug!(error = %e, "the Realtime upstream's connection failed");
                    return "upstream error";
                }
            };
            let close = matches!(message, Message::Close(_));
            let mut cancel = None;
            if let Message::Text(text) = &message {
                cancel = self.server_text(text.as_bytes(), ledger).await;
            }
            let message = match (&self.realtime.key_mask, message) {
                (Some(mask), Message::Text(text)) => Message::Text(mask_text(mask, text)),
                (Some(mask), Message::Binary(data)) => Message::Binary(mask.mask(data)),
                (_, message) => message,
            };
            if matches!(message, Message::Frame(_)) {
                continue;
            }
            if to_client.send(message).await.is_err() {
                return "client gone";
            }
            if let Some((response_id, error)) = cancel {
                let cancel = serde_json::json!({
                    "type": "response.cancel",
                    "response_id": response_id,
                });
                let _ = to_upstream.send(Message::text(cancel.to_string())).await;
                let event = events::error_event(&error, None);
                if to_client.send(Message::text(event)).await.is_err() {
                    return "client gone";
                }
            }
            if close {
                return "upstream closed";
            }
        }
        "upstream gone"
    }

    /// Meters a server event; returns a response to cancel (with why) when the budget cannot
    /// cover one the server started by itself.
    async fn server_text(&self, frame: &[u8], ledger: &Mutex<Ledger>) -> Option<(String, Error)> {
        match events::read_server(frame) {
            ServerEvent::Other => None,
            ServerEvent::Session(ceiling) => {
                lock(ledger).session_ceiling = Some(ceiling);
                None
            }
            ServerEvent::Created { id } => {
                let session_ceiling = {
                    let mut ledger = lock(ledger);
                    if let Some(open) = ledger.open.iter_mut().find(|o| o.response_id.is_none()) {
                        open.response_id = Some(id);
                        return None;
                    }
                    ledger.session_ceiling
                };
                // A response the server started (turn detection): reserve it now.
                let amount = self.reserve_amount(Ceiling::Unset, session_ceiling);
                match self
                    .realtime
                    .budget
                    .admit(Some(&self.session), self.ip, false, amount)
                    .await
                {
                    Ok(admitted) => {
                        lock(ledger).open.push_back(Open {
                            event_id: None,
                            response_id: Some(id),
                            admitted,
                        });
                        None
                    }
                    // Cancelled, but what it used before the cancel arrived is billed all the
                    // same: its `response.done` settles on its usage with nothing reserved.
                    Err(error) => {
                        lock(ledger).open.push_back(Open {
                            event_id: None,
                            response_id: Some(id.clone()),
                            admitted: self
                                .realtime
                                .budget
                                .unreserved(Some(&self.session), self.ip),
                        });
                        Some((id, error))
                    }
                }
            }
            ServerEvent::Done { id, usage } => {
                let open = {
                    let mut ledger = lock(ledger);
                    let at = ledger
                        .open
                        .iter()
                        .position(|o| o.response_id.as_deref() == Some(id.as_str()));
                    at.and_then(|at| ledger.open.remove(at))
                };
                if let Some(open) = open {
                    if usage.is_none() && open.admitted.reserved() > 0 {
                        metrics::counter!("perishable_usage_unread_total").increment(1);
                        tracing::warn!("a Realtime response.done reported no usage");
                    }
                    self.realtime.budget.settle(open.admitted, usage, false);
                }
                None
            }
            ServerEvent::Error {
                event_id: Some(event_id),
            } => {
                // The upstream refused a response.create: nothing was spent.
                let open = {
                    let mut ledger = lock(ledger);
                    let at = ledger.open.iter().position(|o| {
                        o.response_id.is_none() && o.event_id.as_deref() == Some(event_id.as_str())
                    });
                    at.and_then(|at| ledger.open.remove(at))
                };
                if let Some(open) = open {
                    self.realtime.budget.release(open.admitted);
                }
                None
            }
            ServerEvent::Error { event_id: None } => None,
        }
    }

    /// Resolves when the connection must end: its token expires, it is revoked, or it has
    /// lasted `realtime.max_duration_secs`.
    async fn lifetime(&self) -> &'static str {
        let now = unix_now();
        let expires = Duration::from_secs(self.session.claims.exp.saturating_sub(now));
        let expiry = tokio::time::sleep(expires);
        let longest = tokio::time::sleep(self.realtime.max_duration);
        tokio::pin!(expiry, longest);
        let mut check = tokio::time::interval(REVOCATION_CHECK);
        check.set_missed_tick_behavior(tokio::time::MissedTickBehavior::Delay);
        let store = &self.realtime.store;
        let jti = &self.session.claims.jti;
        loop {
            tokio::select! {
                () = &mut expiry => return "session expired",
                () = &mut longest => return "realtime.max_duration_secs reached",
                _ = check.tick() => {
                    let revoked = match store.contains_now(Set::Revoked, jti) {
                        Some(revoked) => Ok(revoked),
                        None => store.contains(Set::Revoked, jti).await,
                    };
                    match revoked {
                        Ok(true) => return "session revoked",
                        Ok(false) => {}
                        // Revocation fails closed, whatever `store.on_unavailable` says.
                        Err(e) => {
                            log_failure("contains", &e, "closed the connection (fail closed)");
                            return "store unavailable";
                        }
                    }
                }
            }
        }
    }
}

/// `text` with the server's key masked (the same text when it is not there).
fn mask_text(mask: &KeyMask, text: Utf8Bytes) -> Utf8Bytes {
    if !mask.is_in(text.as_bytes()) {
        return text;
    }
    // Whole characters of the key became `*`: still UTF-8.
    Utf8Bytes::try_from(mask.mask(Bytes::from(text))).unwrap_or_else(|_| Utf8Bytes::from_static(""))
}

/// Sends what `queue` brings on `sink` until the queue closes or the peer is gone, then closes.
async fn write(
    mut sink: futures_util::stream::SplitSink<Socket, Message>,
    mut queue: mpsc::Receiver<Message>,
) {
    while let Some(message) = queue.recv().await {
        let closing = matches!(message, Message::Close(_));
        if sink.send(message).await.is_err() || closing {
            break;
        }
    }
    let _ = tokio::time::timeout(CLOSING, sink.close()).await;
}

/// A text message of `frame` (UTF-8: it came from a text frame, or from the JSON parser).
fn text_message(frame: Bytes) -> Message {
    match Utf8Bytes::try_from(frame.clone()) {
        Ok(text) => Message::Text(text),
        // Not reached: the strict parser checked the UTF-8, and edits are ASCII.
        Err(_) => Message::text(String::from_utf8_lossy(&frame).into_owned()),
    }
}

fn lock(ledger: &Mutex<Ledger>) -> std::sync::MutexGuard<'_, Ledger> {
    ledger
        .lock()
        .unwrap_or_else(std::sync::PoisonError::into_inner)
}
