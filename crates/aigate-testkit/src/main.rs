//! `aigate-mock`: the mock upstream as a command, for the README quickstart and the benchmark.

use std::sync::Arc;
use std::time::Duration;

use clap::Parser;

/// A mock OpenAI/Anthropic upstream (no API key, no internet).
#[derive(Parser)]
#[command(version, about)]
struct Args {
    /// Address to listen on.
    #[arg(long, default_value = "127.0.0.1:9999")]
    listen: String,
    /// Delay before every response head, in ms.
    #[arg(long, default_value_t = 0)]
    latency_ms: u64,
    /// Delay between SSE events, in ms.
    #[arg(long, default_value_t = 20)]
    chunk_delay_ms: u64,
}

fn main() -> anyhow::Result<()> {
    let args = Args::parse();
    let rt = tokio::runtime::Builder::new_multi_thread().enable_all().build()?;
    rt.block_on(async move {
        let listener = tokio::net::TcpListener::bind(&args.listen).await?;
        let cfg = aigate_testkit::MockConfig {
            latency: Duration::from_millis(args.latency_ms),
            chunk_delay: Duration::from_millis(args.chunk_delay_ms),
            record: false,
        };
        println!("aigate-mock listening on http://{}", listener.local_addr()?);
        let stats = Arc::new(aigate_testkit::MockStats::default());
        tokio::select! {
            _ = aigate_testkit::serve(listener, Arc::new(cfg), stats) => {}
            _ = tokio::signal::ctrl_c() => {}
        }
        Ok(())
    })
}
