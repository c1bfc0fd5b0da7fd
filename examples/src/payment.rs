//! The payment example: a PaymentAgent receives PaymentRequest and replies PaymentResponse; a client
//! sends requests across two sessions and prints the answers.

use std::io::Write;
use std::sync::atomic::{AtomicU64, Ordering};
use std::time::Duration;

use agentcomm_core::prelude::*;
use agentcomm_core::router::SharedRouter;
use serde::{Deserialize, Serialize};

/// A request to charge a user.
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "request")]
pub struct PaymentRequest {
    /// How much, in dollars.
    #[message(min = 0.01)]
    pub amount: f64,
    /// Who pays.
    #[message(non_empty)]
    pub user_id: String,
    /// How they pay.
    #[message(non_empty)]
    pub payment_method: String,
}

/// The answer to a [`PaymentRequest`].
#[derive(Debug, Clone, PartialEq, Serialize, Deserialize, Message)]
#[message(direction = "response")]
pub struct PaymentResponse {
    /// Whether the payment went through.
    pub success: bool,
    /// The transaction id (empty when declined).
    pub transaction_id: String,
    /// A sentence for the user.
    pub message: String,
}

/// Processes payments.
#[agent(receives = [PaymentRequest], sends = [PaymentResponse])]
#[derive(Debug, Default)]
pub struct PaymentAgent {
    processed: AtomicU64,
}

impl Handle<PaymentRequest> for PaymentAgent {
    async fn handle(&self, request: PaymentRequest, ctx: &Context<Self>) -> HandlerResult {
        tracing::info!(
            amount = request.amount,
            user_id = %request.user_id,
            session = ctx.session(),
            "processing payment"
        );
        let response = if request.payment_method == "expired_card" {
            PaymentResponse {
                success: false,
                transaction_id: String::new(),
                message: "Declined: the card has expired".into(),
            }
        } else if request.amount > 10_000.0 {
            PaymentResponse {
                success: false,
                transaction_id: String::new(),
                message: format!(
                    "Declined: ${:.2} is over the $10000.00 limit",
                    request.amount
                ),
            }
        } else {
            let number = self.processed.fetch_add(1, Ordering::Relaxed) + 1;
            PaymentResponse {
                success: true,
                transaction_id: format!("TXN{number:06}"),
                message: format!("Payment of ${:.2} processed successfully", request.amount),
            }
        };
        ctx.reply(response).await?;
        Ok(())
    }
}

/// Sends payment requests.
#[agent(sends = [PaymentRequest])]
#[derive(Debug)]
pub struct PaymentClient;

/// What a run of the example did.
#[derive(Debug, Default)]
pub struct PaymentSummary {
    /// Each request and its answer, in the order sent.
    pub answers: Vec<(String, PaymentRequest, PaymentResponse)>,
    /// Requests refused before they were sent, with the error.
    pub refused: Vec<(PaymentRequest, String)>,
    /// What the agent's health said at the end.
    pub handled: u64,
    /// Dead letters (there should be none).
    pub dead_lettered: u64,
}

fn request(amount: f64, user_id: &str, payment_method: &str) -> PaymentRequest {
    PaymentRequest {
        amount,
        user_id: user_id.into(),
        payment_method: payment_method.into(),
    }
}

/// Runs the example on `router`, printing to `out`.
pub async fn run(router: SharedRouter, out: &mut (dyn Write + Send)) -> Result<PaymentSummary> {
    let backend = router.backend().to_string();
    let options = crate::backend::options_for(&router);
    let runtime = Runtime::builder_shared(router)
        .request_timeout(Duration::from_secs(10))
        .build();
    let agent = runtime.spawn_with(PaymentAgent::default(), options).await?;
    let client = runtime.publisher::<PaymentClient>();
    writeln!(out, "agentcomm payment example on the {backend} router").ok();

    let mut summary = PaymentSummary::default();
    let requests = [
        ("session456", request(100.0, "user123", "credit_card")),
        ("session456", request(42.5, "user123", "paypal")),
        ("session789", request(15_000.0, "user789", "credit_card")),
        ("session789", request(9.99, "user789", "expired_card")),
        ("session789", request(250.0, "user789", "debit_card")),
    ];
    for (session, payment) in requests {
        let answer: PaymentResponse = client.request(session, payment.clone()).await?;
        let verdict = if answer.success {
            "approved"
        } else {
            "declined"
        };
        writeln!(
            out,
            "{session}  {:<8} ${:>9.2}  {:<12} -> {verdict} {} {}",
            payment.user_id,
            payment.amount,
            payment.payment_method,
            answer.transaction_id,
            answer.message
        )
        .ok();
        summary.answers.push((session.to_string(), payment, answer));
    }

    // Validation runs before anything is sent: this one never reaches the broker.
    let invalid = request(-5.0, "user123", "credit_card");
    match client
        .request::<PaymentRequest, PaymentResponse>("session456", invalid.clone())
        .await
    {
        Err(error) => {
            writeln!(out, "refused before sending: {error}").ok();
            summary.refused.push((invalid, error.to_string()));
        }
        Ok(answer) => writeln!(out, "unexpectedly answered: {answer:?}")
            .ok()
            .unwrap_or(()),
    }

    // Stop first: a handler's reply reaches the client before the handler's own acknowledgement, so
    // the counts are final only once the agent has stopped.
    let report = runtime.shutdown(Duration::from_secs(5)).await?;
    let health = agent.health();
    summary.handled = health.handled;
    summary.dead_lettered = health.dead_lettered;
    writeln!(
        out,
        "agent {}: handled {}, failed {}, dead-lettered {}",
        health.name, health.handled, health.failed, health.dead_lettered
    )
    .ok();
    writeln!(
        out,
        "shut down cleanly (finished while stopping: {}, given back: {})",
        report.handled, report.requeued
    )
    .ok();
    Ok(summary)
}
