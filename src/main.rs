mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use smartrelay::config::LogFormat;
use smartrelay::reload::LogLevelSetter;

fn main() -> ExitCode {
    let args = Cli::parse();
    match dispatch(args) {
        Ok(code) => code,
        Err(e) => {
            eprintln!("smartrelay: {e:#}");
            ExitCode::FAILURE
        }
    }
}

fn runtime() -> Result<tokio::runtime::Runtime> {
    Ok(tokio::runtime::Builder::new_multi_thread()
        .enable_all()
        .build()?)
}

fn dispatch(args: Cli) -> Result<ExitCode> {
    match args.command {
        Command::Run { config, log_format } => {
            let cfg = cli::load_config(&config)?;
            // Held to the end: dropping it writes out the lines still queued.
            let (set_log_level, _log_writer) =
                init_logging(&cfg.log.level, cli::log_format(&cfg, log_format));
            let options = smartrelay::app::Options {
                config_path: Some(config.clone()),
                set_log_level: Some(set_log_level),
            };
            let rt = runtime()?;
            let ran = rt.block_on(smartrelay::app::run(cfg, options, shutdown_signal()));
            // A blocking task still running past the stop deadline (a sync that never
            // returns) must not hold the exit: run() already kept the deadline.
            rt.shutdown_timeout(smartrelay::app::RUNTIME_EXIT / 2);
            ran?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let cfg = cli::load_config(&config)?;
            for w in cfg.warnings() {
                println!("warning: {w}");
            }
            for w in runtime()?.block_on(cli::shared_range_overlaps(&cfg)) {
                println!("warning: {w}");
            }
            println!(
                "{}: ok ({} listener(s), {} domain(s), default region {})",
                config.display(),
                cfg.server.listen.len() + cfg.server.listen_tls.len(),
                cfg.access.domains.len(),
                cfg.routing.region
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Queue { action, remote } => cli::queue(action, remote).map(|_| ExitCode::SUCCESS),
        Command::Onboarding { action, remote } => {
            cli::onboarding(action, remote).map(|_| ExitCode::SUCCESS)
        }
        Command::Reload { remote } => cli::reload(remote).map(|_| ExitCode::SUCCESS),
        Command::Trace { search, remote } => cli::trace(search, remote).map(|_| ExitCode::SUCCESS),
        Command::Restricted { action, remote } => {
            cli::restricted(action, remote).map(|_| ExitCode::SUCCESS)
        }
        Command::Completions { shell } => {
            clap_complete::generate(
                shell,
                &mut Cli::command(),
                "smartrelay",
                &mut std::io::stdout(),
            );
            Ok(ExitCode::SUCCESS)
        }
        Command::Man => {
            clap_mangen::Man::new(Cli::command()).render(&mut std::io::stdout())?;
            Ok(ExitCode::SUCCESS)
        }
        Command::Spf { action } => runtime()?.block_on(cli::spf(action)),
        Command::Trusted { action, config } => {
            runtime()?.block_on(cli::trusted(action, &config))?;
            Ok(ExitCode::SUCCESS)
        }
    }
}

/// RUST_LOG, when set, wins over log.level, at start and on reload.
/// Log lines go to stderr from a writer thread of their own, so a session that logs
/// (one line per shared-range message, per refusal) never waits on the write; when
/// its queue is full a session waits rather than a line being lost.
fn init_logging(
    level: &str,
    format: LogFormat,
) -> (LogLevelSetter, tracing_appender::non_blocking::WorkerGuard) {
    let from_env = EnvFilter::try_from_default_env().ok();
    let pinned = from_env.is_some();
    let filter = from_env.unwrap_or_else(|| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let (writer, guard) = tracing_appender::non_blocking::NonBlockingBuilder::default()
        .lossy(false)
        .thread_name("log-writer")
        .finish(std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(writer);
    let set: Box<dyn Fn(EnvFilter) -> Result<(), String> + Send + Sync> = match format {
        LogFormat::Json => {
            let b = builder.json().flatten_event(true).with_filter_reloading();
            let handle = b.reload_handle();
            b.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
        LogFormat::Text => {
            let b = builder.with_filter_reloading();
            let handle = b.reload_handle();
            b.init();
            Box::new(move |f| handle.reload(f).map_err(|e| e.to_string()))
        }
    };
    let setter: LogLevelSetter = Box::new(move |level: &str| {
        if pinned {
            return Ok(());
        }
        let filter = EnvFilter::try_new(level).map_err(|e| format!("log.level: {e}"))?;
        set(filter)
    });
    (setter, guard)
}

async fn shutdown_signal() {
    use tokio::signal::unix::{signal, SignalKind};
    let mut term = match signal(SignalKind::terminate()) {
        Ok(s) => s,
        Err(_) => return std::future::pending().await,
    };
    tokio::select! {
        _ = term.recv() => {}
        _ = tokio::signal::ctrl_c() => {}
    }
}
