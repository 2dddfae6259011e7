//! `imagectl`: the command-line client of imagefleet. It reads the cluster file, signs its
//! calls with an account's credentials, finds region endpoints through the catalog, and prints
//! tables for people or proto3 JSON for programs.
//!
//! - `cli`: the command line (global flags and one enum per command group).
//! - `session`: the cluster file, the account, and signed catalog and region clients.
//! - `regions`, `images`, `instances`, `instance_types`, `billing`: the commands of each
//!   group.
//! - `output`: tables, proto3 JSON and CSV; `paging`: `--all`; `error`: how failures are reported.
//! - `progress`: progress of long operations on stderr (indicatif bars on a terminal, plain
//!   lines otherwise), as tasks with a total in bytes, and status lines.
//! - `load`: `imagectl load`, the load generator (docs/load.md).

pub mod billing;
pub mod cli;
pub mod error;
pub mod images;
pub mod import;
pub mod instance_types;
pub mod instances;
pub mod links;
pub mod load;
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
/// success, 1 when the command failed, 2 for usage errors (clap's, and `CliError::Usage`).
pub fn main() -> ExitCode {
    let cli = match Cli::try_parse() {
        Ok(cli) => cli,
        Err(e) => {
            // Help and version go to stdout with code 0, usage errors to stderr with code 2.
            let _ = e.print();
            return ExitCode::from(u8::try_from(e.exit_code()).unwrap_or(2));
        }
    };
    // A load run drives many calls at once: it gets every core. Other commands make a few
    // calls in turn, on one thread.
    let mut builder = if matches!(cli.command, Command::Load(_)) {
        tokio::runtime::Builder::new_multi_thread()
    } else {
        tokio::runtime::Builder::new_current_thread()
    };
    let result = builder
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
            ExitCode::from(e.exit_code())
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
            let format = cli.global.output.for_resources().map_err(CliError::Usage)?;
            return links::run(&cli.global.cluster, command, format).await;
        }
        Command::Load(args) => {
            let format = cli.global.output.for_resources().map_err(CliError::Usage)?;
            return load::run(&cli.global, args, format, progress).await;
        }
        other => other,
    };
    // The output format is checked before the cluster file is read: a format the command
    // does not print is a usage error whatever the cluster.
    if let Command::Billing(command) = command {
        let format = cli.global.output.for_billing().map_err(CliError::Usage)?;
        let session = Session::open(&cli.global.cluster, cli.global.account.as_deref())?;
        return billing::run(&session, command, format).await;
    }
    let format = cli.global.output.for_resources().map_err(CliError::Usage)?;
    let session = Session::open(&cli.global.cluster, cli.global.account.as_deref())?;
    match command {
        Command::Regions(command) => regions::run(&session, command, format).await,
        Command::Images(command) => images::run(&session, command, format, progress).await,
        Command::Instances(command) => instances::run(&session, command, format).await,
        Command::InstanceTypes(command) => instance_types::run(&session, command, format).await,
        Command::Completions(_)
        | Command::Man(_)
        | Command::Billing(_)
        | Command::Links(_)
        | Command::Load(_) => Ok(String::new()),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn completions_and_manual_pages_include_the_billing_commands() {
        let bash = completions(clap_complete::Shell::Bash);
        for word in [
            "billing", "prices", "inquire", "report", "--from", "--hours", "csv",
        ] {
            assert!(
                bash.contains(word),
                "{word} missing from the bash completions"
            );
        }
        let dir = tempfile::tempdir().expect("temp dir");
        man(Some(dir.path())).expect("pages written");
        for page in [
            "imagectl-billing.1",
            "imagectl-billing-prices.1",
            "imagectl-billing-inquire.1",
            "imagectl-billing-report.1",
        ] {
            let text = std::fs::read_to_string(dir.path().join(page)).expect(page);
            assert!(!text.is_empty(), "{page}");
        }
        let report = std::fs::read_to_string(dir.path().join("imagectl-billing-report.1"))
            .expect("the report page");
        assert!(report.contains("RFC 3339"), "{report}");
    }
}
