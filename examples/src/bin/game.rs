//! `cargo run -p agentcomm-examples --bin game`: the multi-agent game on the router named by
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
