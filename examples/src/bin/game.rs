//! `cargo run -p agentcomm-examples --bin game`: the multi-agent game on the router named by
//! `MESSAGING_BACKEND` (the in-memory router when unset).

use agentcomm_core::logging::{self, LogConfig};
use tracing::level_filters::LevelFilter;

#[tokio::main]
async fn main() -> std::process::ExitCode {
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
        agentcomm_examples::game::run(router, 6, &mut std::io::stdout()).await
    }
    .await;
    match result {
        Ok(_) => std::process::ExitCode::SUCCESS,
        Err(error) => {
            eprintln!("error: {error}");
            std::process::ExitCode::FAILURE
        }
    }
}
