//! Payload codecs: MessagePack (the default) and JSON.
//!
//! MessagePack is written in its map form (field names included, like JSON) so that adding an optional
//! field keeps old and new readers working: an old reader ignores the new key, a new reader fills a
//! missing one from `#[serde(default)]`. Never use `#[serde(deny_unknown_fields)]` on a message.

use bytes::Bytes;
use serde::Serialize;
use serde::de::DeserializeOwned;

use crate::error::{Error, Result};

/// The content type of MessagePack payloads.
pub const MSGPACK_CONTENT_TYPE: &str = "application/msgpack";
/// The content type of JSON payloads.
pub const JSON_CONTENT_TYPE: &str = "application/json";
/// The content type of payloads that are raw bytes, such as a malformed frame kept in a dead letter.
pub const BINARY_CONTENT_TYPE: &str = "application/octet-stream";

/// How a message is turned into payload bytes.
#[derive(Debug, Clone, Copy, Default, PartialEq, Eq, Hash)]
#[non_exhaustive]
pub enum Codec {
    /// MessagePack, struct-as-map (`rmp_serde::to_vec_named`). Compact and fast; the default.
    #[default]
    MessagePack,
    /// JSON. Readable with any tool; larger and slower.
    Json,
}

impl Codec {
    /// The content type written in envelopes encoded with this codec.
    pub fn content_type(self) -> &'static str {
        match self {
            Codec::MessagePack => MSGPACK_CONTENT_TYPE,
            Codec::Json => JSON_CONTENT_TYPE,
        }
    }

    /// The codec for a content type, if it is one of ours.
    pub fn from_content_type(content_type: &str) -> Option<Codec> {
        match content_type {
            MSGPACK_CONTENT_TYPE | "application/x-msgpack" | "application/vnd.msgpack" => {
                Some(Codec::MessagePack)
            }
            JSON_CONTENT_TYPE => Some(Codec::Json),
            _ => None,
        }
    }

    /// Parses a codec name as written in configuration: `msgpack`/`messagepack` or `json`.
    pub fn from_name(name: &str) -> Option<Codec> {
        match name.to_ascii_lowercase().as_str() {
            "msgpack" | "messagepack" | "rmp" => Some(Codec::MessagePack),
            "json" => Some(Codec::Json),
            _ => None,
        }
    }

    /// Encodes a message.
    pub fn encode<M: Serialize + ?Sized>(self, class: &str, message: &M) -> Result<Bytes> {
        match self {
            Codec::MessagePack => {
                let mut buffer = Vec::with_capacity(128);
                message
                    .serialize(&mut rmp_serde::Serializer::new(&mut buffer).with_struct_map())
                    .map_err(|e| Error::encode(class, e))?;
                Ok(Bytes::from(buffer))
            }
            Codec::Json => serde_json::to_vec(message)
                .map(Bytes::from)
                .map_err(|e| Error::encode(class, e)),
        }
    }

    /// Decodes a message.
    pub fn decode<M: DeserializeOwned>(self, class: &str, payload: &[u8]) -> Result<M> {
        match self {
            Codec::MessagePack => {
                rmp_serde::from_slice(payload).map_err(|e| Error::decode(class, e))
            }
            Codec::Json => serde_json::from_slice(payload).map_err(|e| Error::decode(class, e)),
        }
    }
}

#[cfg(test)]
mod tests {
    use super::*;
    use serde::Deserialize;

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PaymentV1 {
        amount: f64,
        user_id: String,
    }

    #[derive(Debug, PartialEq, Serialize, Deserialize)]
    struct PaymentV2 {
        amount: f64,
        user_id: String,
        #[serde(default)]
        currency: Option<String>,
    }

    #[test]
    fn adding_an_optional_field_keeps_old_and_new_readers_working() {
        for codec in [Codec::MessagePack, Codec::Json] {
            let old = PaymentV1 {
                amount: 12.5,
                user_id: "u1".into(),
            };
            let new = PaymentV2 {
                amount: 12.5,
                user_id: "u1".into(),
                currency: Some("EUR".into()),
            };

            // A new reader reads what an old writer wrote: the missing field takes its default.
            let from_old: PaymentV2 = codec
                .decode("Payment", &codec.encode("Payment", &old).unwrap())
                .unwrap();
            assert_eq!(
                from_old,
                PaymentV2 {
                    amount: 12.5,
                    user_id: "u1".into(),
                    currency: None
                }
            );

            // An old reader reads what a new writer wrote: the extra field is ignored.
            let from_new: PaymentV1 = codec
                .decode("Payment", &codec.encode("Payment", &new).unwrap())
                .unwrap();
            assert_eq!(from_new, old);
        }
    }

    #[test]
    fn positional_messagepack_would_break_old_readers() {
        // Why the map form: the array form that `rmp_serde::to_vec` writes breaks an old reader.
        let new = PaymentV2 {
            amount: 1.0,
            user_id: "u".into(),
            currency: None,
        };
        let positional = rmp_serde::to_vec(&new).unwrap();
        assert!(rmp_serde::from_slice::<PaymentV1>(&positional).is_err());
        let named = Codec::MessagePack.encode("Payment", &new).unwrap();
        assert!(
            Codec::MessagePack
                .decode::<PaymentV1>("Payment", &named)
                .is_ok()
        );
    }

    #[test]
    fn decode_errors_name_the_class() {
        let error = Codec::MessagePack
            .decode::<PaymentV1>("PaymentRequest", b"\xc1garbage")
            .unwrap_err();
        assert!(
            error
                .to_string()
                .starts_with("could not decode PaymentRequest: "),
            "{error}"
        );
        assert!(Codec::from_content_type("text/plain").is_none());
        assert_eq!(
            Codec::from_content_type(Codec::Json.content_type()),
            Some(Codec::Json)
        );
    }
}
