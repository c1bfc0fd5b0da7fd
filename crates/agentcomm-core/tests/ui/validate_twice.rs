use agentcomm_core::prelude::*;
use serde::{Deserialize, Serialize};

#[derive(Serialize, Deserialize, Message)]
#[message(validate = Self::positive, validate = Self::small)]
struct Payment {
    amount: i64,
}

impl Payment {
    fn positive(&self) -> Result<(), ValidationError> {
        Ok(())
    }
    fn small(&self) -> Result<(), ValidationError> {
        Ok(())
    }
}

fn main() {}
