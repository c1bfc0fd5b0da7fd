//! The first example of `docs/testing.md` ("Testing an agent"), run as the test it is. The guide's
//! doctest only compiles it: rustdoc wraps an example in a `main` of its own, where a
//! `#[tokio::test]` function is never called. This file holds the example word for word (unformatted,
//! as the guide shows it), and `the_guide_shows_this_example` checks that the guide still does.

#[rustfmt::skip]
mod example {
use std::time::Duration;
use agentcomm_core::prelude::*;
use agentcomm_testkit::TestHarness;
use serde::{Deserialize, Serialize};

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "request")]
struct PaymentRequest { amount: f64, user_id: String }

#[derive(Debug, Clone, Serialize, Deserialize, Message)]
#[message(direction = "response")]
struct PaymentResponse { success: bool, transaction_id: String }

#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
struct PaymentAgent;

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        ctx.reply(PaymentResponse {
            success: request.amount > 0.0,
            transaction_id: format!("TXN-{}", request.user_id),
        })
        .await?;
        Ok(())
    }
}

#[tokio::test]
async fn a_payment_is_answered_in_its_session() {
    let h = TestHarness::new().await;                 // a fresh in-memory router
    h.spawn(PaymentAgent).await;                      // subscribed and running

    let request = h
        .send("session456", PaymentRequest { amount: 100.0, user_id: "user123".into() })
        .await;

    let response = h
        .expect::<PaymentResponse>()
        .session("session456")
        .matching(|response| response.success)
        .within(Duration::from_secs(1))
        .await;                                       // the decoded message and its envelope
    assert_eq!(response.transaction_id, "TXN-user123");
    assert_eq!(response.envelope.correlation_id(), Some(request.id().to_string().as_str()));

    h.assert_nothing_else_published().await;          // no stray event, no dead letter
}
}

/// The guide's first Rust block after "## Testing an agent" is the example above, unchanged.
#[test]
fn the_guide_shows_this_example() {
    let example = example_of(include_str!("../../../../docs/testing.md"));
    assert!(
        include_str!("guide.rs")
            .replace("\r\n", "\n")
            .contains(&example),
        "the example under \"Testing an agent\" in docs/testing.md is no longer the one in \
         tests/integration/guide.rs: copy it here, so that it runs\n{example}"
    );
}

/// The first Rust block under "## Testing an agent" in `guide`, with `\n` line ends whatever the
/// checkout's (git may check the files out with `\r\n`).
fn example_of(guide: &str) -> String {
    let guide = guide.replace("\r\n", "\n");
    let start = guide
        .find("## Testing an agent")
        .and_then(|section| {
            guide[section..]
                .find("```rust\n")
                .map(|at| section + at + 8)
        })
        .expect("docs/testing.md has a Rust block under \"## Testing an agent\"");
    let length = guide[start..]
        .find("```\n")
        .expect("the guide's example block ends");
    guide[start..start + length].to_string()
}

/// A checkout with `\r\n` line ends (git's `core.autocrlf` on Windows) finds the same example: the
/// check compared bytes, and failed there though nothing had changed.
#[test]
fn the_example_is_found_with_crlf_line_ends() {
    let guide = include_str!("../../../../docs/testing.md");
    assert_eq!(example_of(&guide.replace('\n', "\r\n")), example_of(guide));
}
