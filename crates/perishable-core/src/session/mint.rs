//! Parsing the `POST /session` body into a [`MintRequest`], with a PROTOCOL code for each fault.

use serde_json::{Map, Value};

use crate::entropy::{Entropy, MAX_SAMPLES};
use crate::error::{Error, ErrorCode};
use crate::fingerprint;
use crate::pow::PowSolution;

/// A validated `POST /session` body.
#[derive(Debug, Clone, PartialEq)]
pub struct MintRequest {
    /// The client's fingerprint (validated).
    pub fingerprint: String,
    /// Interaction samples (within limits).
    pub entropy: Entropy,
    /// The proof of work, when given.
    pub pow: Option<PowSolution>,
}

fn invalid_json(message: impl Into<std::borrow::Cow<'static, str>>) -> Error {
    Error::new(ErrorCode::InvalidJson, message)
}

impl MintRequest {
    /// Parses and validates a body.
    pub fn parse(body: &[u8]) -> Result<Self, Error> {
        // Each field is kept as JSON first, so a wrong type gets its own error code.
        let mut raw: Map<String, Value> = serde_json::from_slice(body).map_err(|e| {
            invalid_json(format!(
                "the body must be a JSON object with fingerprint, entropy and pow: {}",
                e.classify_message()
            ))
        })?;
        let fingerprint = match raw.remove("fingerprint") {
            None | Some(Value::Null) => {
                return Err(Error::new(
                    ErrorCode::MissingFingerprint,
                    "the fingerprint is required",
                ));
            }
            Some(Value::String(s)) => s,
            Some(_) => {
                return Err(Error::new(
                    ErrorCode::InvalidFingerprint,
                    "the fingerprint must be a string",
                ));
            }
        };
        fingerprint::validate(&fingerprint)?;
        let entropy: Entropy = match raw.remove("entropy") {
            None | Some(Value::Null) => Entropy::default(),
            Some(v) => serde_json::from_value(v).map_err(|_| {
                invalid_json(
                    "entropy must be {\"pointer\": [[t_ms, x, y], ...], \"keys\": [t_ms, ...], \"elapsed_ms\": n}",
                )
            })?,
        };
        if !entropy.within_limits() {
            return Err(invalid_json(format!(
                "entropy may hold at most {MAX_SAMPLES} pointer samples and {MAX_SAMPLES} key times"
            )));
        }
        let pow = match raw.remove("pow") {
            None | Some(Value::Null) => None,
            Some(v) => Some(serde_json::from_value(v).map_err(|_| {
                invalid_json("pow must be {\"challenge\": string, \"nonce\": string}")
            })?),
        };
        Ok(Self {
            fingerprint,
            entropy,
            pow,
        })
    }
}

trait ClassifyMessage {
    fn classify_message(&self) -> &'static str;
}

impl ClassifyMessage for serde_json::Error {
    fn classify_message(&self) -> &'static str {
        match self.classify() {
            serde_json::error::Category::Syntax | serde_json::error::Category::Eof => {
                "malformed JSON"
            }
            serde_json::error::Category::Data => "not an object of the expected shape",
            serde_json::error::Category::Io => "unreadable",
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    fn code(body: &str) -> ErrorCode {
        MintRequest::parse(body.as_bytes()).unwrap_err().code()
    }

    #[test]
    fn each_fault_has_its_code() {
        assert_eq!(code("{"), ErrorCode::InvalidJson);
        assert_eq!(code("[1]"), ErrorCode::InvalidJson);
        assert_eq!(code("{}"), ErrorCode::MissingFingerprint);
        assert_eq!(
            code(r#"{"fingerprint":null}"#),
            ErrorCode::MissingFingerprint
        );
        assert_eq!(code(r#"{"fingerprint":42}"#), ErrorCode::InvalidFingerprint);
        assert_eq!(
            code(r#"{"fingerprint":"short"}"#),
            ErrorCode::InvalidFingerprint
        );
        assert_eq!(
            code(r#"{"fingerprint":"device-123456","entropy":{"pointer":"x"}}"#),
            ErrorCode::InvalidJson
        );
        assert_eq!(
            code(r#"{"fingerprint":"device-123456","pow":{"challenge":1}}"#),
            ErrorCode::InvalidJson
        );
        let many = format!(
            r#"{{"fingerprint":"device-123456","entropy":{{"keys":[{}]}}}}"#,
            vec!["1"; MAX_SAMPLES + 1].join(",")
        );
        assert_eq!(code(&many), ErrorCode::InvalidJson);
    }

    #[test]
    fn a_good_body_parses() {
        let r = MintRequest::parse(
            br#"{"fingerprint":"device-123456","entropy":{"pointer":[[0,1,2]],"keys":[5],"elapsed_ms":9},"pow":{"challenge":"c","nonce":"n"}}"#,
        )
        .unwrap();
        assert_eq!(r.fingerprint, "device-123456");
        assert_eq!(r.entropy.pointer, vec![[0.0, 1.0, 2.0]]);
        assert_eq!(r.pow.unwrap().nonce, "n");
    }
}
