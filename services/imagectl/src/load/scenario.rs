//! Scenarios: what a load run does. Built-in ones by name, or a TOML file (docs/load.md):
//!
//! ```toml
//! regions = ["ap-guangzhou"]          # default for every operation
//! accounts = ["100000000001"]         # default for every operation
//! share_with = "100000000002"         # receiver of `share` operations
//! instance_type = "S5.SMALL1"
//!
//! [[operation]]
//! kind = "describe"                   # describe | launch | copy | share
//! weight = 6
//!
//! [[operation]]
//! kind = "copy"
//! weight = 1
//! to = ["ap-shanghai"]
//! image_bytes = 1048576
//! ```

use serde::Deserialize;

/// The built-in scenarios, in the order `--help` lists them.
pub const BUILTIN: [&str; 5] = ["describe", "launch", "copy", "share", "mixed"];

/// What one operation does (each is a few calls; docs/load.md lists them).
#[derive(Clone, Copy, Debug, PartialEq, Eq, Hash, PartialOrd, Ord, Deserialize)]
#[serde(rename_all = "lowercase")]
pub enum Kind {
    /// DescribeImages of one public image by id, then a page of 20 public images.
    Describe,
    /// RunInstances of one instance from a public image, then TerminateInstances of it.
    Launch,
    /// SyncImages of a small custom image to another region, DescribeImages of the copy until
    /// it is NORMAL, then DeleteImages of the copy.
    Copy,
    /// ModifyImageSharePermission SHARE of a custom image, the receiver's DescribeImages and
    /// RunInstances/TerminateInstances of it, then CANCEL.
    Share,
}

impl Kind {
    pub fn name(self) -> &'static str {
        match self {
            Kind::Describe => "describe",
            Kind::Launch => "launch",
            Kind::Copy => "copy",
            Kind::Share => "share",
        }
    }
}

/// The instance type operations launch unless told otherwise.
pub const DEFAULT_INSTANCE_TYPE: &str = "S5.SMALL1";
/// Bytes written into a custom image's instance before it is made (copy, share).
pub const DEFAULT_IMAGE_BYTES: u64 = 1 << 20;
/// The most bytes a scenario may write into a custom image.
pub const MAX_IMAGE_BYTES: u64 = 256 << 20;

/// One operation of a scenario, with every default filled in but the regions and accounts
/// (empty: the run's defaults).
#[derive(Clone, Debug, PartialEq)]
pub struct Operation {
    pub kind: Kind,
    pub weight: u32,
    pub regions: Vec<String>,
    pub accounts: Vec<String>,
    /// Copy destinations (empty: found at set-up).
    pub to: Vec<String>,
    pub instance_type: String,
    /// System disk of launched instances, GiB (0: the image's size).
    pub disk_size_gib: u64,
    /// Bytes written into a custom image before it is made.
    pub image_bytes: u64,
}

/// A scenario: its operations, mixed by weight.
#[derive(Clone, Debug, PartialEq)]
pub struct Scenario {
    pub name: String,
    pub operations: Vec<Operation>,
    /// The account `share` operations share with (default: another account of the cluster).
    pub share_with: Option<String>,
    /// Whether an operation whose needs the cluster cannot meet (a second account, a second
    /// region) is dropped instead of failing the run (the built-in `mixed`).
    pub optional_needs: bool,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct FileSpec {
    name: Option<String>,
    regions: Option<Vec<String>>,
    accounts: Option<Vec<String>>,
    share_with: Option<String>,
    instance_type: Option<String>,
    image_bytes: Option<u64>,
    #[serde(default, rename = "operation")]
    operations: Vec<OperationSpec>,
}

#[derive(Debug, Deserialize)]
#[serde(deny_unknown_fields)]
struct OperationSpec {
    kind: Kind,
    weight: Option<u32>,
    regions: Option<Vec<String>>,
    accounts: Option<Vec<String>>,
    to: Option<Vec<String>>,
    instance_type: Option<String>,
    disk_size_gib: Option<u64>,
    image_bytes: Option<u64>,
}

fn operation(kind: Kind, weight: u32) -> Operation {
    Operation {
        kind,
        weight,
        regions: Vec::new(),
        accounts: Vec::new(),
        to: Vec::new(),
        instance_type: DEFAULT_INSTANCE_TYPE.to_string(),
        disk_size_gib: 0,
        image_bytes: DEFAULT_IMAGE_BYTES,
    }
}

/// The built-in scenario `name`, if there is one.
pub fn builtin(name: &str) -> Option<Scenario> {
    let single = |kind| Scenario {
        name: name.to_string(),
        operations: vec![operation(kind, 1)],
        share_with: None,
        optional_needs: false,
    };
    match name {
        "describe" => Some(single(Kind::Describe)),
        "launch" => Some(single(Kind::Launch)),
        "copy" => Some(single(Kind::Copy)),
        "share" => Some(single(Kind::Share)),
        "mixed" => Some(Scenario {
            name: name.to_string(),
            operations: vec![
                operation(Kind::Describe, 6),
                operation(Kind::Launch, 2),
                operation(Kind::Copy, 1),
                operation(Kind::Share, 1),
            ],
            share_with: None,
            optional_needs: true,
        }),
        _ => None,
    }
}

/// Parses a scenario file's text; `origin` names it in errors.
pub fn parse(text: &str, origin: &str) -> Result<Scenario, String> {
    let spec: FileSpec = toml::from_str(text).map_err(|e| {
        let message = e.message().to_string();
        match e.span() {
            Some(span) => {
                let line = text[..span.start.min(text.len())].matches('\n').count() + 1;
                format!("{origin}, line {line}: {message}")
            }
            None => format!("{origin}: {message}"),
        }
    })?;
    let bad = |what: String| Err(format!("{origin}: {what}"));
    if spec.operations.is_empty() {
        return bad(
            "no operations: add at least one [[operation]] with a kind (describe, launch, \
             copy, share)"
                .into(),
        );
    }
    let check_list = |what: &str, list: &Option<Vec<String>>| -> Result<(), String> {
        match list {
            Some(l) if l.is_empty() => Err(format!(
                "{origin}: {what} is empty (leave it out for the default)"
            )),
            Some(l) if l.iter().any(|s| s.trim().is_empty()) => {
                Err(format!("{origin}: {what} holds an empty name"))
            }
            _ => Ok(()),
        }
    };
    check_list("regions", &spec.regions)?;
    check_list("accounts", &spec.accounts)?;
    let check_bytes = |what: String, bytes: Option<u64>| -> Result<(), String> {
        match bytes {
            Some(b) if b > MAX_IMAGE_BYTES => Err(format!(
                "{origin}: {what} is {b}, over the most a scenario writes ({MAX_IMAGE_BYTES})"
            )),
            _ => Ok(()),
        }
    };
    check_bytes("image_bytes".into(), spec.image_bytes)?;
    let mut operations = Vec::new();
    for (i, op) in spec.operations.into_iter().enumerate() {
        let what = |field: &str| format!("operation {} ({}): {field}", i + 1, op.kind.name());
        let weight = op.weight.unwrap_or(1);
        if weight == 0 {
            return bad(format!(
                "{} is 0: leave the operation out instead",
                what("weight")
            ));
        }
        check_list(&what("regions"), &op.regions)?;
        check_list(&what("accounts"), &op.accounts)?;
        check_list(&what("to"), &op.to)?;
        check_bytes(what("image_bytes"), op.image_bytes)?;
        if op.to.is_some() && op.kind != Kind::Copy {
            return bad(format!("{} is for copy operations only", what("to")));
        }
        if op.disk_size_gib.is_some_and(|g| g > 2048) {
            return bad(format!("{} is over 2048", what("disk_size_gib")));
        }
        let instance_type = op
            .instance_type
            .or_else(|| spec.instance_type.clone())
            .unwrap_or_else(|| DEFAULT_INSTANCE_TYPE.to_string());
        if instance_type.trim().is_empty() {
            return bad(format!("{} is empty", what("instance_type")));
        }
        operations.push(Operation {
            kind: op.kind,
            weight,
            regions: op
                .regions
                .or_else(|| spec.regions.clone())
                .unwrap_or_default(),
            accounts: op
                .accounts
                .or_else(|| spec.accounts.clone())
                .unwrap_or_default(),
            to: op.to.unwrap_or_default(),
            instance_type,
            disk_size_gib: op.disk_size_gib.unwrap_or(0),
            image_bytes: op
                .image_bytes
                .or(spec.image_bytes)
                .unwrap_or(DEFAULT_IMAGE_BYTES),
        });
    }
    Ok(Scenario {
        name: spec.name.unwrap_or_else(|| origin.to_string()),
        operations,
        share_with: spec.share_with,
        optional_needs: false,
    })
}

/// The scenario SCENARIO names: a built-in one, or a file.
pub fn load(name: &str) -> Result<Scenario, String> {
    if let Some(scenario) = builtin(name) {
        return Ok(scenario);
    }
    let path = std::path::Path::new(name);
    match std::fs::read_to_string(path) {
        Ok(text) => parse(&text, name),
        Err(e) if e.kind() == std::io::ErrorKind::NotFound => Err(format!(
            "{name}: neither a built-in scenario ({}) nor a scenario file",
            BUILTIN.join(", ")
        )),
        Err(e) => Err(format!("cannot read scenario file {name}: {e}")),
    }
}

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn a_full_file_parses_with_its_defaults() {
        let text = r#"
name = "night mix"
regions = ["ap-guangzhou", "ap-shanghai"]
accounts = ["100000000001"]
share_with = "100000000002"
instance_type = "S5.MEDIUM4"
image_bytes = 4096

[[operation]]
kind = "describe"
weight = 6

[[operation]]
kind = "copy"
regions = ["ap-guangzhou"]
to = ["ap-shanghai"]
image_bytes = 2097152

[[operation]]
kind = "launch"
weight = 2
instance_type = "S5.SMALL1"
disk_size_gib = 60
accounts = ["100000000002"]
"#;
        let s = parse(text, "mix.toml").expect("parses");
        assert_eq!(s.name, "night mix");
        assert_eq!(s.share_with.as_deref(), Some("100000000002"));
        assert_eq!(s.operations.len(), 3);
        let describe = &s.operations[0];
        assert_eq!((describe.kind, describe.weight), (Kind::Describe, 6));
        assert_eq!(describe.regions, ["ap-guangzhou", "ap-shanghai"]);
        assert_eq!(describe.instance_type, "S5.MEDIUM4");
        assert_eq!(describe.image_bytes, 4096);
        let copy = &s.operations[1];
        assert_eq!(copy.weight, 1);
        assert_eq!(copy.regions, ["ap-guangzhou"]);
        assert_eq!(copy.to, ["ap-shanghai"]);
        assert_eq!(copy.image_bytes, 2 << 20);
        let launch = &s.operations[2];
        assert_eq!(launch.instance_type, "S5.SMALL1");
        assert_eq!(launch.disk_size_gib, 60);
        assert_eq!(launch.accounts, ["100000000002"]);
    }

    #[test]
    fn a_minimal_file_takes_the_run_defaults() {
        let s = parse("[[operation]]\nkind = \"launch\"\n", "x.toml").expect("parses");
        assert_eq!(s.name, "x.toml");
        let op = &s.operations[0];
        assert_eq!(op.weight, 1);
        assert!(op.regions.is_empty() && op.accounts.is_empty() && op.to.is_empty());
        assert_eq!(op.instance_type, DEFAULT_INSTANCE_TYPE);
        assert_eq!(op.image_bytes, DEFAULT_IMAGE_BYTES);
    }

    #[test]
    fn bad_files_are_refused_with_what_and_where() {
        for (text, expected) in [
            ("", "no operations"),
            ("name = \"x\"\n", "no operations"),
            (
                "[[operation]]\nkind = \"explode\"\n",
                "line 2: unknown variant `explode`",
            ),
            ("[[operation]]\nweight = 2\n", "missing field `kind`"),
            (
                "[[operation]]\nkind = \"describe\"\nweight = 0\n",
                "operation 1 (describe): weight is 0",
            ),
            (
                "[[operation]]\nkind = \"describe\"\nweight = -1\n",
                "line 3",
            ),
            (
                "[[operation]]\nkind = \"describe\"\ncolour = \"red\"\n",
                "unknown field `colour`",
            ),
            (
                "regions = []\n[[operation]]\nkind = \"describe\"\n",
                "regions is empty",
            ),
            (
                "[[operation]]\nkind = \"launch\"\nto = [\"ap-shanghai\"]\n",
                "to is for copy operations only",
            ),
            (
                "[[operation]]\nkind = \"copy\"\nimage_bytes = 999999999999\n",
                "image_bytes is 999999999999",
            ),
            (
                "[[operation]]\nkind = \"launch\"\ndisk_size_gib = 4096\n",
                "disk_size_gib is over 2048",
            ),
            ("[[operation]\nkind = \"launch\"\n", "line 1"),
        ] {
            let err = parse(text, "bad.toml").expect_err(text);
            assert!(err.starts_with("bad.toml"), "{text:?}: {err}");
            assert!(err.contains(expected), "{text:?}: {err}");
        }
    }

    #[test]
    fn built_in_scenarios_are_known_by_name() {
        for name in BUILTIN {
            let s = builtin(name).expect(name);
            assert_eq!(s.name, name);
            assert!(!s.operations.is_empty());
        }
        let mixed = builtin("mixed").unwrap();
        let kinds: Vec<Kind> = mixed.operations.iter().map(|o| o.kind).collect();
        assert_eq!(
            kinds,
            [Kind::Describe, Kind::Launch, Kind::Copy, Kind::Share]
        );
        assert!(mixed.optional_needs);
        let err = load("/nonexistent/scenario.toml").expect_err("missing");
        assert!(err.contains("neither a built-in scenario"), "{err}");
    }
}
