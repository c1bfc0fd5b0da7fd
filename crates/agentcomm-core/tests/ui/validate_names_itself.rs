use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

// Without a method `validate` of the type's own, `Self::validate` is `Message::validate`, the method
// the derive writes: it would call itself until the stack overflows, aborting the process at the first
// publish or decode.
#[derive(Serialize, Deserialize, Message)]
#[message(validate = Self::validate)]
struct Payment {
    #[message(min = 1)]
    amount: i64,
}

// With one, `payment.validate()` would call it and skip the field rules.
#[derive(Serialize, Deserialize, Message)]
#[message(validate = Refund::validate)]
struct Refund {
    #[message(min = 1)]
    amount: i64,
}

impl Refund {
    fn validate(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

// The trait's method, named through the trait.
#[derive(Serialize, Deserialize, Message)]
#[message(validate = agentcomm_core::Message::validate)]
struct Tip {
    #[message(min = 1)]
    amount: i64,
}

fn main() {}
