use anyhow::Context as _;
use clap::Parser as _;
use flask_ebpf_exporter::{
    agent::Agent, config::Config, preflight, routes::discovery::helper::child as helper,
};

fn main() -> anyhow::Result<()> {
    // The route-discovery helper: the agent starts its own binary so.
    if std::env::args_os().nth(1).as_deref() == Some(std::ffi::OsStr::new(helper::SUBCOMMAND)) {
        std::process::exit(helper::main());
    }
    let config = Config::parse();
    tracing_subscriber::fmt()
        .with_env_filter(tracing_subscriber::EnvFilter::try_new(&config.log).context("--log")?)
        .with_writer(std::io::stderr)
        .init();
    let settings = config.settings()?;
    // Before any thread starts: capabilities raised here pass to the
    // threads started after.
    let granted = preflight::check()?;
    let runtime = tokio::runtime::Builder::new_multi_thread()
        .worker_threads(1)
        .enable_all()
        .build()
        .context("starting the async runtime")?;
    runtime.block_on(async { Agent::start(settings, granted).await?.run().await })?;
    Ok(())
}
