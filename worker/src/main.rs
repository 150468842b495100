use std::process::ExitCode;

use clap::Parser;
use clipqc::cli::{self, Cli, Command};

fn main() -> ExitCode {
    let cli = Cli::parse();
    cli::init_logging(cli.log_format == cli::LogFormat::Json);
    let result = match cli.command {
        Command::Classify(args) => cli::classify::run(args),
        Command::Run(args) => cli::run::run(args),
        Command::Bench(args) => cli::bench::run(args),
        Command::Exemplar(args) => cli::exemplar::run(args),
        Command::Eval(args) => cli::eval::run(args),
        Command::Adapt(args) => cli::adapt::run(args),
    };
    match result {
        Ok(true) => ExitCode::SUCCESS,
        Ok(false) => ExitCode::from(1),
        Err(e) => {
            eprintln!("error: {e:#}");
            ExitCode::from(2)
        }
    }
}
