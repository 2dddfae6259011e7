//! Emulated links between regions (`--link`, `--links-file`, `--realistic-links`; docs/links.md).

use clap::Args;
use imagefleet_rpc::link::{parse_links_file, LinkEntry, Links};
use std::path::PathBuf;

#[derive(Args, Debug, Clone, Default)]
pub struct LinkArgs {
    /// Emulate the network between two regions, both directions: `A,B=SPEC`, SPEC being
    /// comma-separated `rtt:100ms`, `jitter:5ms`, `rate:100mbit` (kbit, mbit, gbit),
    /// `loss:0.1%`, `down`. Repeatable; in IMAGEFLEET_LINKS, separate entries with `;`.
    #[arg(
        long = "link",
        value_name = "A,B=SPEC",
        env = "IMAGEFLEET_LINKS",
        value_delimiter = ';'
    )]
    links: Vec<String>,
    /// A file of links, one `A,B=SPEC` a line (`#` comments).
    #[arg(long, env = "IMAGEFLEET_LINKS_FILE")]
    links_file: Option<PathBuf>,
    /// Realistic round trips between regions without a link of their own: 30 ms between
    /// mainland regions, 80 ms between overseas regions, 180 ms between the two.
    #[arg(long, env = "IMAGEFLEET_REALISTIC_LINKS")]
    realistic_links: bool,
}

impl LinkArgs {
    /// Sets the process's links (the file's entries first, then the flags').
    pub fn install(&self) -> anyhow::Result<()> {
        let mut entries = Vec::new();
        if let Some(path) = &self.links_file {
            let text = std::fs::read_to_string(path)
                .map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?;
            entries.extend(
                parse_links_file(&text).map_err(|e| anyhow::anyhow!("{}: {e}", path.display()))?,
            );
        }
        for text in self.links.iter().filter(|t| !t.trim().is_empty()) {
            let entry: LinkEntry = text
                .parse()
                .map_err(|e| anyhow::anyhow!("--link {text}: {e}"))?;
            entries.push(entry);
        }
        let links = Links::global();
        if self.realistic_links {
            links.set_realistic(true);
        }
        for entry in &entries {
            links.apply(entry);
            tracing::info!(link = %entry, "emulated link");
        }
        Ok(())
    }
}
