//! What the relay reads of the Realtime events: the client's `response.create` (its ceiling)
//! and `session.update` (its model), read once by the strict parser of metered calls; the
//! server's `session.*`, `response.created`, `response.done` (its usage) and `error` events.
//!
//! A client event is forwarded as the client wrote it, byte for byte, except a
//! `response.create` whose ceiling the completion cap lowers: that one member is edited in
//! place, as in an HTTP call's body.

use bytes::Bytes;

use crate::error::{Error, ErrorCode};
use crate::json::{self, Edit, Kind, Member, Mode, Object};
use crate::usage::Usage;

/// The ceiling members of a response: the GA name, then the beta one.
const CEILINGS: [&str; 2] = ["max_output_tokens", "max_response_output_tokens"];

/// The members the relay acts on. One that differs from these only in case is refused, as a
/// case-folding reader (Go's `encoding/json`) would take it for the real one.
const READ: [&str; 7] = [
    "type",
    "event_id",
    "response",
    "session",
    "model",
    "max_output_tokens",
    "max_response_output_tokens",
];

/// A response's ceiling on output tokens.
#[derive(Debug, Clone, Copy, PartialEq, Eq)]
pub(crate) enum Ceiling {
    /// Not set here.
    Unset,
    /// `"inf"`: the model's own limit.
    Infinite,
    /// At most this many.
    Tokens(u64),
}

/// What the relay does with a client's text frame.
#[derive(Debug)]
pub(crate) enum ClientEvent {
    /// Forward it as it is.
    Forward,
    /// A `response.create`: reserve, then forward `body`.
    Create {
        /// Its ceiling (after the cap).
        ceiling: Ceiling,
        /// The client's `event_id`, which an upstream `error` about it names.
        event_id: Option<String>,
        /// The frame to forward (edited only when the cap lowered its ceiling).
        body: Bytes,
    },
}

/// Reads a client's text frame. `cap` is `budget.max_completion_tokens` (0: none);
/// `allowed_models` the allow-list (empty: any); `beta` whether the connection speaks the beta
/// protocol (the ceiling member the cap inserts is then `max_response_output_tokens`).
pub(crate) fn read_client(
    frame: &Bytes,
    cap: u64,
    allowed_models: &[String],
    beta: bool,
) -> Result<ClientEvent, Error> {
    let object = json::parse_object(frame, Mode::Strict).map_err(|e| {
        Error::new(
            ErrorCode::InvalidJson,
            format!("the event is not JSON the proxy can meter: {e}"),
        )
    })?;
    refuse_folded(&object)?;
    let kind = match object.get("type") {
        Some(member) if member.kind == Kind::String => json::string(frame, member),
        _ => return Err(invalid("an event needs a string \"type\"")),
    };
    match kind.as_str() {
        "session.update" => {
            if let Some(session) = object.get("session").filter(|m| m.kind != Kind::Null) {
                let (slice, inner) = nested(frame, session, "session")?;
                check_model(slice, &inner, allowed_models)?;
                ceiling_of(slice, &inner)?;
            }
            Ok(ClientEvent::Forward)
        }
        "response.create" => {
            let event_id = match object.get("event_id") {
                Some(member) if member.kind == Kind::String => Some(json::string(frame, member)),
                _ => None,
            };
            let mut edits = Vec::new();
            let ceiling = match object.get("response").filter(|m| m.kind != Kind::Null) {
                None => {
                    if cap > 0 {
                        let field = if beta { CEILINGS[1] } else { CEILINGS[0] };
                        let value = format!("{{\"{field}\":{cap}}}");
                        edits.push(match object.get("response") {
                            Some(null) => json::replace_value(null, value.as_bytes()),
                            None => json::insert_member(&object, "response", value.as_bytes()),
                        });
                    }
                    Ceiling::Unset
                }
                Some(response) => {
                    let (slice, inner) = nested(frame, response, "response")?;
                    check_model(slice, &inner, allowed_models)?;
                    let ceiling = ceiling_of(slice, &inner)?;
                    if cap > 0 {
                        cap_in(slice, &inner, response.value.start, cap, beta, &mut edits)?;
                    }
                    ceiling
                }
            };
            let ceiling = match (ceiling, cap) {
                (_, 0) => ceiling,
                (Ceiling::Tokens(n), cap) => Ceiling::Tokens(n.min(cap)),
                (_, cap) => Ceiling::Tokens(cap),
            };
            Ok(ClientEvent::Create {
                ceiling,
                event_id,
                body: json::apply(frame, edits),
            })
        }
        _ => Ok(ClientEvent::Forward),
    }
}

/// Lowers the ceilings of the response object `inner` (at `offset` in the frame) to `cap`, or
/// inserts one.
fn cap_in(
    slice: &[u8],
    inner: &Object,
    offset: usize,
    cap: u64,
    beta: bool,
    edits: &mut Vec<Edit>,
) -> Result<(), Error> {
    let value = itoa::Buffer::new().format(cap).to_owned();
    let mut named = false;
    for member in CEILINGS.iter().filter_map(|name| inner.get(name)) {
        named = true;
        if matches!(ceiling(slice, member)?, Ceiling::Tokens(n) if n <= cap) {
            continue;
        }
        let edit = json::replace_value(member, value.as_bytes());
        edits.push(edit.shifted(offset));
    }
    if !named {
        let field = if beta { CEILINGS[1] } else { CEILINGS[0] };
        edits.push(json::insert_member(inner, field, value.as_bytes()).shifted(offset));
    }
    Ok(())
}

/// The object value of `member`, parsed strictly on its own ([`json::nested_object`]).
fn nested<'a>(frame: &'a [u8], member: &Member, name: &str) -> Result<(&'a [u8], Object), Error> {
    let (_, slice, inner) = json::nested_object(frame, member)
        .ok_or_else(|| invalid(format!("{name} must be an object")))?;
    refuse_folded(&inner)?;
    Ok((slice, inner))
}

/// The model allow-list, on an object's `model` member when it has one.
fn check_model(slice: &[u8], object: &Object, allowed: &[String]) -> Result<(), Error> {
    let Some(member) = object.get("model").filter(|m| m.kind != Kind::Null) else {
        return Ok(());
    };
    if member.kind != Kind::String {
        return Err(invalid("model must be a string"));
    }
    let model = json::string(slice, member);
    if allowed.is_empty() || allowed.contains(&model) {
        Ok(())
    } else {
        Err(Error::new(
            ErrorCode::ModelNotAllowed,
            format!("the model {model:?} is not allowed"),
        ))
    }
}

/// The largest ceiling an object sets (`"inf"` above any number).
fn ceiling_of(slice: &[u8], object: &Object) -> Result<Ceiling, Error> {
    let mut out = Ceiling::Unset;
    for member in CEILINGS.iter().filter_map(|name| object.get(name)) {
        out = match (out, ceiling(slice, member)?) {
            (Ceiling::Infinite, _) | (_, Ceiling::Infinite) => Ceiling::Infinite,
            (Ceiling::Tokens(a), Ceiling::Tokens(b)) => Ceiling::Tokens(a.max(b)),
            (Ceiling::Unset, c) | (c, Ceiling::Unset) => c,
        };
    }
    Ok(out)
}

/// One ceiling member: a non-negative integer spelt as one, `"inf"`, or `null`.
fn ceiling(slice: &[u8], member: &Member) -> Result<Ceiling, Error> {
    let raw = slice.get(member.value.clone()).unwrap_or_default();
    let refuse = || {
        invalid(format!(
            "{} must be a non-negative integer or \"inf\"",
            member.key
        ))
    };
    match member.kind {
        Kind::Null => Ok(Ceiling::Unset),
        Kind::String if json::string(slice, member) == "inf" => Ok(Ceiling::Infinite),
        Kind::Number if raw.iter().all(u8::is_ascii_digit) => std::str::from_utf8(raw)
            .ok()
            .and_then(|s| s.parse::<u64>().ok())
            .map(Ceiling::Tokens)
            .ok_or_else(refuse),
        _ => Err(refuse()),
    }
}

fn refuse_folded(object: &Object) -> Result<(), Error> {
    for member in &object.members {
        if let Some(field) = json::folds_to(&member.key, &READ) {
            return Err(invalid(format!(
                "the member {:?} differs from {field:?} only in case; send {field:?}",
                member.key
            )));
        }
    }
    Ok(())
}

fn invalid(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorCode::InvalidParameter, message)
}

/// What the relay reads of a server event.
#[derive(Debug, PartialEq, Eq)]
pub(crate) enum ServerEvent {
    /// Anything else: passed on.
    Other,
    /// `session.created` / `session.updated`: the session's ceiling for responses.
    Session(Ceiling),
    /// `response.created`: a response began.
    Created {
        /// Its id.
        id: String,
    },
    /// `response.done`: a response ended, with its usage when reported.
    Done {
        /// Its id.
        id: String,
        /// `response.usage`.
        usage: Option<Usage>,
    },
    /// `error`, naming the client event it is about.
    Error {
        /// `error.event_id`.
        event_id: Option<String>,
    },
}

/// Reads a server event (trusted: the lenient reading of upstream responses).
pub(crate) fn read_server(frame: &[u8]) -> ServerEvent {
    let Ok(object) = json::parse_object(frame, Mode::Lenient) else {
        return ServerEvent::Other;
    };
    let Some(kind) = object.get("type").filter(|m| m.kind == Kind::String) else {
        return ServerEvent::Other;
    };
    let member_object = |name: &str| {
        let member = object.get(name).filter(|m| m.kind == Kind::Object)?;
        let slice = frame.get(member.value.clone())?;
        let inner = json::parse_object(slice, Mode::Lenient).ok()?;
        Some((slice, inner))
    };
    let id_of = |slice: &[u8], inner: &Object| {
        inner
            .get("id")
            .filter(|m| m.kind == Kind::String)
            .map(|m| json::string(slice, m))
            .unwrap_or_default()
    };
    match json::string(frame, kind).as_str() {
        "session.created" | "session.updated" => match member_object("session") {
            Some((slice, inner)) => {
                ServerEvent::Session(ceiling_of(slice, &inner).unwrap_or(Ceiling::Infinite))
            }
            None => ServerEvent::Other,
        },
        "response.created" => match member_object("response") {
            Some((slice, inner)) => ServerEvent::Created {
                id: id_of(slice, &inner),
            },
            None => ServerEvent::Other,
        },
        "response.done" => match member_object("response") {
            Some((slice, inner)) => ServerEvent::Done {
                id: id_of(slice, &inner),
                usage: inner
                    .get("usage")
                    .filter(|m| m.kind == Kind::Object)
                    .and_then(|m| slice.get(m.value.clone()))
                    .and_then(Usage::parse),
            },
            None => ServerEvent::Other,
        },
        "error" => ServerEvent::Error {
            event_id: member_object("error").and_then(|(slice, inner)| {
                inner
                    .get("event_id")
                    .filter(|m| m.kind == Kind::String)
                    .map(|m| json::string(slice, m))
            }),
        },
        _ => ServerEvent::Other,
    }
}

/// A Realtime `error` event for the client, in the API's shape, about its event `about`. Its
/// own `event_id` is unique in the process: the time, then a counter.
pub(crate) fn error_event(error: &Error, about: Option<&str>) -> String {
    static SENT: std::sync::atomic::AtomicU64 = std::sync::atomic::AtomicU64::new(0);
    let n = SENT.fetch_add(1, std::sync::atomic::Ordering::Relaxed);
    serde_json::json!({
        "type": "error",
        "event_id": format!("event_perishable_{}_{n}", crate::clock::unix_now()),
        "error": {
            "type": error.code().error_type(),
            "code": error.code().as_str(),
            "message": error.message(),
            "param": null,
            "event_id": about,
        }
    })
    .to_string()
}

#[cfg(test)]
mod tests {
    use super::*;

    fn client(frame: &str, cap: u64, beta: bool) -> Result<ClientEvent, ErrorCode> {
        read_client(
            &Bytes::from(frame.to_owned()),
            cap,
            &["gpt-realtime".into()],
            beta,
        )
        .map_err(|e| e.code())
    }

    fn create(frame: &str, cap: u64, beta: bool) -> (Ceiling, Option<String>, String) {
        match client(frame, cap, beta).unwrap() {
            ClientEvent::Create {
                ceiling,
                event_id,
                body,
            } => (ceiling, event_id, String::from_utf8(body.to_vec()).unwrap()),
            other => panic!("{other:?}"),
        }
    }

    #[test]
    fn a_response_create_is_read_for_its_ceiling() {
        let (ceiling, id, body) = create(
            r#"{"type":"response.create","event_id":"e1","response":{"max_output_tokens":50}}"#,
            0,
            false,
        );
        assert_eq!(ceiling, Ceiling::Tokens(50));
        assert_eq!(id.as_deref(), Some("e1"));
        assert!(body.contains("50"));
        let (ceiling, ..) = create(r#"{"type":"response.create"}"#, 0, false);
        assert_eq!(ceiling, Ceiling::Unset);
        let (ceiling, ..) = create(
            r#"{"type":"response.create","response":{"max_response_output_tokens":"inf"}}"#,
            0,
            false,
        );
        assert_eq!(ceiling, Ceiling::Infinite);
    }

    #[test]
    fn the_cap_edits_only_the_ceiling() {
        let (ceiling, _, body) = create(
            r#"{ "type" : "response.create", "response": {"max_output_tokens": "inf", "x": 1.50} }"#,
            100,
            false,
        );
        assert_eq!(ceiling, Ceiling::Tokens(100));
        assert_eq!(
            body,
            r#"{ "type" : "response.create", "response": {"max_output_tokens": 100, "x": 1.50} }"#
        );
        let (_, _, body) = create(r#"{"type":"response.create"}"#, 100, true);
        assert_eq!(
            body,
            r#"{"type":"response.create","response":{"max_response_output_tokens":100}}"#
        );
        let (_, _, body) = create(r#"{"type":"response.create","response":{}}"#, 7, false);
        assert_eq!(
            body,
            r#"{"type":"response.create","response":{"max_output_tokens":7}}"#
        );
        // A ceiling under the cap is left as written.
        let frame = r#"{"type":"response.create","response":{"max_output_tokens":5}}"#;
        let (ceiling, _, body) = create(frame, 100, false);
        assert_eq!((ceiling, body.as_str()), (Ceiling::Tokens(5), frame));
    }

    #[test]
    fn what_cannot_be_metered_is_refused() {
        for frame in [
            "not json",
            r#"{"type":"response.create","type":"x"}"#,
            "\u{feff}{}",
        ] {
            assert_eq!(client(frame, 0, false).unwrap_err(), ErrorCode::InvalidJson);
        }
        for frame in [
            r#"{"kind":"response.create"}"#,
            r#"{"type":1}"#,
            r#"{"Type":"response.create","type":"x"}"#,
            r#"{"type":"response.create","response":{"max_output_tokens":1.5}}"#,
            r#"{"type":"response.create","response":{"max_output_tokens":"100"}}"#,
            r#"{"type":"response.create","response":{"MAX_OUTPUT_TOKENS":1}}"#,
            r#"{"type":"response.create","response":[]}"#,
        ] {
            assert_eq!(
                client(frame, 0, false).unwrap_err(),
                ErrorCode::InvalidParameter,
                "{frame}"
            );
        }
    }

    #[test]
    fn a_session_update_cannot_leave_the_allow_list() {
        assert!(matches!(
            client(
                r#"{"type":"session.update","session":{"model":"gpt-realtime"}}"#,
                0,
                false
            ),
            Ok(ClientEvent::Forward)
        ));
        assert_eq!(
            client(
                r#"{"type":"session.update","session":{"model":"gpt-5-pro"}}"#,
                0,
                false
            )
            .unwrap_err(),
            ErrorCode::ModelNotAllowed
        );
        assert_eq!(
            client(
                r#"{"type":"session.update","session":{"model":7}}"#,
                0,
                false
            )
            .unwrap_err(),
            ErrorCode::InvalidParameter
        );
    }

    #[test]
    fn server_events_are_read() {
        assert_eq!(
            read_server(br#"{"type":"response.created","response":{"id":"r1"}}"#),
            ServerEvent::Created { id: "r1".into() }
        );
        let ServerEvent::Done { id, usage } = read_server(
            br#"{"type":"response.done","response":{"id":"r1","usage":{"total_tokens":30,"input_tokens":10,"output_tokens":20}}}"#,
        ) else {
            panic!()
        };
        assert_eq!(id, "r1");
        assert_eq!(usage.unwrap().total_tokens, 30);
        assert_eq!(
            read_server(br#"{"type":"error","error":{"event_id":"e1","code":"x"}}"#),
            ServerEvent::Error {
                event_id: Some("e1".into())
            }
        );
        assert_eq!(
            read_server(br#"{"type":"session.created","session":{"max_output_tokens":"inf"}}"#),
            ServerEvent::Session(Ceiling::Infinite)
        );
        assert_eq!(
            read_server(br#"{"type":"response.output_text.delta","delta":"hi"}"#),
            ServerEvent::Other
        );
        assert_eq!(read_server(b"\x00garbage"), ServerEvent::Other);
    }

    #[test]
    fn the_error_event_has_the_api_shape() {
        let error = Error::new(ErrorCode::BudgetExhausted, "no tokens left");
        let event: serde_json::Value =
            serde_json::from_str(&error_event(&error, Some("e9"))).unwrap();
        assert_eq!(event["type"], "error");
        assert_eq!(event["error"]["code"], "budget_exhausted");
        assert_eq!(event["error"]["type"], "rate_limit_error");
        assert_eq!(event["error"]["event_id"], "e9");
        // Two in the same second have ids of their own.
        let again: serde_json::Value =
            serde_json::from_str(&error_event(&error, Some("e9"))).unwrap();
        assert_ne!(event["event_id"], again["event_id"]);
    }

    proptest::proptest! {
        /// Whatever the client sends, the relay either refuses it or forwards exactly it (a
        /// `response.create` without a cap included).
        #[test]
        fn without_a_cap_frames_pass_unchanged(frame in ".{0,200}") {
            let bytes = Bytes::from(frame.clone());
            if let Ok(event) = read_client(&bytes, 0, &[], false) {
                match event {
                    ClientEvent::Forward => {}
                    ClientEvent::Create { body, .. } => proptest::prop_assert_eq!(body, bytes),
                }
            }
        }

        /// With a cap, a `response.create` always comes out with every ceiling at most the cap,
        /// as the strict parser reads it.
        #[test]
        fn with_a_cap_every_ceiling_is_capped(
            ceiling in proptest::option::of(0u64..100_000),
            inf in proptest::bool::ANY,
            beta in proptest::bool::ANY,
            cap in 1u64..10_000,
        ) {
            let response = match (ceiling, inf) {
                (_, true) => r#"{"max_output_tokens":"inf","voice":"x"}"#.to_owned(),
                (Some(n), false) => format!(r#"{{"max_response_output_tokens":{n}}}"#),
                (None, false) => "{}".to_owned(),
            };
            let frame = Bytes::from(format!(r#"{{"type":"response.create","response":{response}}}"#));
            let ClientEvent::Create { ceiling: read, body, .. } =
                read_client(&frame, cap, &[], beta).unwrap() else { panic!() };
            let Ceiling::Tokens(read) = read else { panic!() };
            proptest::prop_assert!(read <= cap);
            let again = read_client(&body, 0, &[], beta).unwrap();
            let ClientEvent::Create { ceiling: forwarded, .. } = again else { panic!() };
            proptest::prop_assert_eq!(forwarded, Ceiling::Tokens(read));
        }
    }
}
