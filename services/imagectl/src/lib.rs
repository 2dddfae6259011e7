//! `imagectl`: the command-line client of imagefleet. It reads the cluster file, signs its
//! calls with an account's credentials, finds region endpoints through the catalog, and prints
//! tables for people or proto3 JSON for programs.
//!
//! - `cli`: the command line (global flags and one enum per command group).
//! - `session`: the cluster file, the account, and signed catalog and region clients.
//! - `regions`, `images`, `instances`, `instance_types`: the commands of each group.
//! - `output`: tables and proto3 JSON; `paging`: `--all`; `error`: how failures are reported.
//! - `progress`: progress of long operations on stderr (indicatif bars on a terminal, plain
//!   lines otherwise), as tasks with a total in bytes.

pub mod cli;
pub mod error;
pub mod images;
pub mod import;
pub mod instance_types;
pub mod instances;
pub mod links;
pub mod output;
pub mod paging;
pub mod progress;
pub mod regions;
pub mod session;

use clap::Parser;
use cli::{Cli, Command};
use error::{CliError, Result};
use progress::Progress;
use session::Session;
use std::io::Write;
use std::process::ExitCode;

/// Parses the command line, runs the command and prints its result. Exit codes: 0 on
/// success, 1 when the command failed, clap's own (2) for usage errors.
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0, usage errors to stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    let result = tokio::runtime::Builder::new_current_thread()
        .enable_all()
        .build()
        .map_err(|e| CliError::Failed(format!("cannot start the async runtime: {e}")))
        .and_then(|runtime| runtime.block_on(run(cli)))
        .and_then(|text| {
            let mut stdout = std::io::stdout().lock();
            stdout
                .write_all(text.as_bytes())
                .and_then(|_| stdout.flush())
                .map_err(|e| CliError::io("cannot write to stdout", e))
        });
    match result {
        Ok(()) => ExitCode::SUCCESS,
        Err(e) => {
            // Error messages carry text from servers (and echo their input): escaped.
            let _ = writeln!(
                std::io::stderr(),
                "error: {}",
                output::escape(&e.to_string())
            );
            ExitCode::FAILURE
        }
    }
}

/// Runs one command; returns what it prints on stdout. Progress goes to stderr.
pub async fn run(cli: Cli) -> Result<String> {
    run_with_progress(cli, &Progress::stderr()).await
}

/// Whether a path given for a file means stdin or stdout: `-`.
pub fn is_stdio(path: &std::path::Path) -> bool {
    path.as_os_str() == "-"
}

/// The shell completion script for `shell`.
pub fn completions(shell: clap_complete::Shell) -> String {
    let mut command = <Cli as clap::CommandFactory>::command();
    let mut out = Vec::new();
    clap_complete::generate(shell, &mut command, "imagectl", &mut out);
    String::from_utf8_lossy(&out).into_owned()
}

/// The manual page of `imagectl` (roff); with `dir`, one page per command written there.
pub fn man(dir: Option<&std::path::Path>) -> Result<String> {
    let command = <Cli as clap::CommandFactory>::command();
    match dir {
        Some(dir) => {
            std::fs::create_dir_all(dir)
                .and_then(|_| clap_mangen::generate_to(command, dir))
                .map_err(|e| CliError::io(format!("cannot write pages to {}", dir.display()), e))?;
            Ok(String::new())
        }
        None => {
            let mut out = Vec::new();
            clap_mangen::Man::new(command)
                .render(&mut out)
                .map_err(|e| CliError::io("cannot render the manual page", e))?;
            Ok(String::from_utf8_lossy(&out).into_owned())
        }
    }
}

/// Runs one command with its progress (of `images sync --wait`) shown on `progress`;
/// returns what it prints on stdout.
pub async fn run_with_progress(cli: Cli, progress: &Progress) -> Result<String> {
    match &cli.command {
        Command::Completions(args) => return Ok(completions(args.shell)),
        Command::Man(args) => return man(args.out.as_deref()),
        _ => {}
    }
    let command = match cli.command {
        // Operator commands: service credentials from the cluster file, no account.
        Command::Links(command) => {
            return links::run(&cli.global.cluster, command, cli.global.output).await
        }
        other => other,
    };
    let session = Session::open(&cli.global.cluster, cli.global.account.as_deref())?;
    let format = cli.global.output;
    match command {
        Command::Regions(command) => regions::run(&session, command, format).await,
        Command::Images(command) => images::run(&session, command, format, progress).await,
        Command::Instances(command) => instances::run(&session, command, format).await,
        Command::InstanceTypes(command) => instance_types::run(&session, command, format).await,
        Command::Completions(_) | Command::Man(_) | Command::Links(_) => Ok(String::new()),
    }
}
