//! `cargo run -p agentcomm-examples --bin payment`: the payment example on the router named by
//! `MESSAGING_BACKEND` (the in-memory router when unset).

use agentcomm_examples::backend;

#[tokio::main]
async fn main() -> std::process::ExitCode {
    // `.env` and the environment; LOG_LEVEL=INFO in either shows the JSON Lines logs (quiet otherwise).
    let (config, _guard) = match backend::configure() {
        Ok(started) => started,
        Err(error) => {
            eprintln!("error: {error}");
            return std::process::ExitCode::FAILURE;
        }
    };
    let result = async {
        let router = backend::router_from_config(&config).await?;
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
