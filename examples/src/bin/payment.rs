//! `cargo run -p agentcomm-examples --bin payment`: the payment example on the router named by
//! `MESSAGING_BACKEND` (the in-memory router when unset).

use agentcomm_core::logging::{self, LogConfig};
use tracing::level_filters::LevelFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // Quiet by default so the answers stand out; LOG_LEVEL=INFO shows the JSON Lines logs.
    let config = match std::env::var_os(logging::LOG_LEVEL_ENV) {
        Some(_) => LogConfig::from_env(),
        None => Ok(LogConfig::new().level(LevelFilter::WARN)),
    };
    let _guard = match config.and_then(logging::init) {
        Ok(guard) => guard,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = async {
        let (_, router) = agentcomm_examples::backend::router_from_env().await?;
        agentcomm_examples::payment::run(router, &mut std::io::stdout()).await
    }
    .await;
    match result {
        Ok(summary) if summary.answers.len() == 5 && summary.dead_lettered == 0 => {
            std::process::ExitCode::SUCCESS
        }
        Ok(summary) => {
            eprintln!("error: expected 5 answers and no dead letters, got {summary:?}");
            std::process::ExitCode::FAILURE
        }
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
