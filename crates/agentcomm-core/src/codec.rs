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
    /// JSON. Readable with any tool; larger and slower. JSON has no NaN or infinity: a message holding
    /// one is refused when it is encoded (MessagePack carries them).
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
            Codec::Json => {
                let json = serde_json::to_vec(message).map_err(|e| Error::encode(class, e))?;
                // serde_json writes NaN and the infinities as `null`: the receiver would then fail to
                // decode an `f64` field, or read `None` from an `Option<f64>` that held a number. A
                // payload with a `null` in it is checked again, for such numbers, and refused.
                if json.windows(4).any(|window| window == b"null") {
                    finite::check(message).map_err(|e| Error::encode(class, e))?;
                }
                Ok(Bytes::from(json))
            }
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

/// Finds a NaN or an infinite number in a value about to be written as JSON, which has neither.
mod finite {
    use std::fmt;

    use serde::ser::{self, Serialize};

    /// Why a value cannot be written as JSON: the number, and the field it is in when it is in one.
    #[derive(Debug)]
    pub(super) struct NotFinite(String);

    impl fmt::Display for NotFinite {
        fn fmt(&self, f: &mut fmt::Formatter<'_>) -> fmt::Result {
            f.write_str(&self.0)
        }
    }

    impl std::error::Error for NotFinite {}

    impl ser::Error for NotFinite {
        fn custom<T: fmt::Display>(message: T) -> Self {
            NotFinite(message.to_string())
        }
    }

    /// Fails on the first NaN or infinity in `value`, naming its field.
    pub(super) fn check<T: Serialize + ?Sized>(value: &T) -> Result<(), NotFinite> {
        value.serialize(Checker { field: None })
    }

    /// Walks a value without writing it; `field` is the struct field it is in, if any.
    #[derive(Clone, Copy)]
    struct Checker {
        field: Option<&'static str>,
    }

    impl Checker {
        fn number(self, finite: bool, text: &dyn fmt::Display) -> Result<(), NotFinite> {
            if finite {
                return Ok(());
            }
            let place = match self.field {
                Some(field) => format!(" in field `{field}`"),
                None => String::new(),
            };
            Err(NotFinite(format!(
                "{text}{place} cannot be written as JSON (it has no NaN or infinity, and serde_json \
                 would write null, which the receiver cannot read back as that number); publish with \
                 the MessagePack codec (the default), or refuse such values with \
                 #[message(min = .., max = ..)] on the field"
            )))
        }

        fn inside<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NotFinite> {
            value.serialize(self)
        }

        fn in_field<T: Serialize + ?Sized>(
            self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            value.serialize(Checker { field: Some(field) })
        }
    }

    impl ser::Serializer for Checker {
        type Ok = ();
        type Error = NotFinite;
        type SerializeSeq = Self;
        type SerializeTuple = Self;
        type SerializeTupleStruct = Self;
        type SerializeTupleVariant = Self;
        type SerializeMap = Self;
        type SerializeStruct = Self;
        type SerializeStructVariant = Self;

        fn serialize_f32(self, v: f32) -> Result<(), NotFinite> {
            self.number(v.is_finite(), &v)
        }
        fn serialize_f64(self, v: f64) -> Result<(), NotFinite> {
            self.number(v.is_finite(), &v)
        }
        fn serialize_bool(self, _: bool) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i8(self, _: i8) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i16(self, _: i16) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i32(self, _: i32) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i64(self, _: i64) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_i128(self, _: i128) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u8(self, _: u8) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u16(self, _: u16) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u32(self, _: u32) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u64(self, _: u64) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_u128(self, _: u128) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_char(self, _: char) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_str(self, _: &str) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_bytes(self, _: &[u8]) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_none(self) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_some<T: Serialize + ?Sized>(self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn serialize_unit(self) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_unit_struct(self, _: &'static str) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_unit_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
        ) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_newtype_struct<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn serialize_newtype_variant<T: Serialize + ?Sized>(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn serialize_seq(self, _: Option<usize>) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_tuple(self, _: usize) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_tuple_struct(self, _: &'static str, _: usize) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_tuple_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_map(self, _: Option<usize>) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_struct(self, _: &'static str, _: usize) -> Result<Self, NotFinite> {
            Ok(self)
        }
        fn serialize_struct_variant(
            self,
            _: &'static str,
            _: u32,
            _: &'static str,
            _: usize,
        ) -> Result<Self, NotFinite> {
            Ok(self)
        }
    }

    impl ser::SerializeSeq for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTuple for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_element<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTupleStruct for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeTupleVariant for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeMap for Checker {
        type Ok = ();
        type Error = NotFinite;
        // A float key is refused by serde_json itself.
        fn serialize_key<T: Serialize + ?Sized>(&mut self, _: &T) -> Result<(), NotFinite> {
            Ok(())
        }
        fn serialize_value<T: Serialize + ?Sized>(&mut self, value: &T) -> Result<(), NotFinite> {
            self.inside(value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeStruct for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.in_field(field, value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
        }
    }

    impl ser::SerializeStructVariant for Checker {
        type Ok = ();
        type Error = NotFinite;
        fn serialize_field<T: Serialize + ?Sized>(
            &mut self,
            field: &'static str,
            value: &T,
        ) -> Result<(), NotFinite> {
            self.in_field(field, value)
        }
        fn end(self) -> Result<(), NotFinite> {
            Ok(())
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

    /// JSON has no NaN or infinity: serde_json writes them as `null`, which turned an `Option<f64>`
    /// holding a number into `None` on the receiver, and made an `f64` field undecodable there (the
    /// message dead-lettered, while its publish had succeeded).
    #[test]
    fn json_refuses_numbers_it_cannot_carry_instead_of_writing_null() {
        #[derive(Debug, Clone, PartialEq, Serialize, Deserialize)]
        struct Reading {
            sensor: String,
            value: f64,
            peak: Option<f32>,
            history: Vec<f64>,
            missing: Option<f64>,
        }
        let finite = Reading {
            sensor: "null".into(),
            value: -0.5,
            peak: Some(1.5),
            history: vec![1.0, f64::MAX],
            missing: None,
        };
        let encoded = Codec::Json.encode("Reading", &finite).unwrap();
        let read: Reading = Codec::Json.decode("Reading", &encoded).unwrap();
        assert_eq!(read, finite);

        let cases = [
            (
                "value",
                Reading {
                    value: f64::NAN,
                    ..finite.clone()
                },
            ),
            (
                "peak",
                Reading {
                    peak: Some(f32::INFINITY),
                    ..finite.clone()
                },
            ),
            (
                "history",
                Reading {
                    history: vec![1.0, f64::NEG_INFINITY],
                    ..finite.clone()
                },
            ),
            (
                "missing",
                Reading {
                    missing: Some(f64::NAN),
                    ..finite.clone()
                },
            ),
        ];
        for (field, reading) in cases {
            let error = Codec::Json.encode("Reading", &reading).unwrap_err();
            let text = error.to_string();
            assert!(text.contains(&format!("field `{field}`")), "{text}");
            assert!(
                text.contains("MessagePack"),
                "the error names the fix: {text}"
            );
            // MessagePack carries them.
            let encoded = Codec::MessagePack.encode("Reading", &reading).unwrap();
            let read: Reading = Codec::MessagePack.decode("Reading", &encoded).unwrap();
            assert_eq!(format!("{read:?}"), format!("{reading:?}"));
        }
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
