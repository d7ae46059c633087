mod cli;

use std::process::ExitCode;

use anyhow::Result;
use clap::{CommandFactory, Parser};
use tracing_subscriber::EnvFilter;

use cli::{Cli, Command};
use smartrelay::config::LogFormat;

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
            init_logging(&cfg.log.level, cli::log_format(&cfg, log_format));
            runtime()?.block_on(smartrelay::app::run(
                cfg,
                Some(config.clone()),
                shutdown_signal(),
            ))?;
            Ok(ExitCode::SUCCESS)
        }
        Command::CheckConfig { config } => {
            let cfg = cli::load_config(&config)?;
            for w in cfg.warnings() {
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
            cli::trusted(action, &config).map(|_| ExitCode::SUCCESS)
        }
    }
}

/// RUST_LOG, when set, wins over log.level.
fn init_logging(level: &str, format: LogFormat) {
    let filter = EnvFilter::try_from_default_env().unwrap_or_else(|_| EnvFilter::new(level));
    let ansi = std::io::IsTerminal::is_terminal(&std::io::stderr());
    let builder = tracing_subscriber::fmt()
        .with_env_filter(filter)
        .with_ansi(ansi)
        .with_writer(std::io::stderr);
    match format {
        LogFormat::Json => builder.json().flatten_event(true).init(),
        LogFormat::Text => builder.init(),
    }
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
