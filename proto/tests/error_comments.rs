//! Every rpc of every proto lists the errors it can answer in the comment above it, and every
//! service lists the errors all of its calls can get, in one format:
//!
//! ```text
//! // Errors (besides those every call can get, see the service comment):
//! //   NOT_FOUND InvalidImageId.NotFound: no such image, or not visible to the caller.
//! //     (a continuation is indented two more)
//! ```
//!
//! or, for an rpc with none of its own,
//! `// Errors: none besides those every call can get (see the service comment).`

use std::path::{Path, PathBuf};

const RPC_HEADER: &str = "// Errors (besides those every call can get, see the service comment):";
const RPC_NONE: &str =
    "// Errors: none besides those every call can get (see the service comment).";
const SERVICE_HEADER: &str = "// Errors every call can get, not repeated under each rpc:";

/// The canonical gRPC codes, as the comments spell them.
const CODES: &[&str] = &[
    "CANCELLED",
    "UNKNOWN",
    "INVALID_ARGUMENT",
    "DEADLINE_EXCEEDED",
    "NOT_FOUND",
    "ALREADY_EXISTS",
    "PERMISSION_DENIED",
    "RESOURCE_EXHAUSTED",
    "FAILED_PRECONDITION",
    "ABORTED",
    "OUT_OF_RANGE",
    "UNIMPLEMENTED",
    "INTERNAL",
    "UNAVAILABLE",
    "DATA_LOSS",
    "UNAUTHENTICATED",
];

/// `//   CODE Reason.Sub: when.`
fn is_reason_line(line: &str) -> bool {
    let Some(rest) = line.strip_prefix("//   ") else {
        return false;
    };
    let Some((code, rest)) = rest.split_once(' ') else {
        return false;
    };
    let Some((reason, when)) = rest.split_once(": ") else {
        return false;
    };
    CODES.contains(&code)
        && reason.starts_with(|c: char| c.is_ascii_uppercase())
        && reason
            .split('.')
            .all(|part| !part.is_empty() && part.chars().all(|c| c.is_ascii_alphanumeric()))
        && !when.trim().is_empty()
}

fn is_continuation(line: &str) -> bool {
    line.strip_prefix("//     ")
        .is_some_and(|rest| !rest.starts_with(' ') && !rest.is_empty())
}

/// Checks the lines after an errors header: reasons (at least one), each maybe continued.
fn check_reasons(lines: &[&str], what: &str, problems: &mut Vec<String>) {
    if lines.first().is_none_or(|l| !is_reason_line(l)) {
        problems.push(format!(
            "{what}: the errors header is not followed by a reason line"
        ));
    }
    for line in lines {
        if !is_reason_line(line) && !is_continuation(line) {
            problems.push(format!(
                "{what}: {line:?} is not `//   CODE Reason: when` nor a continuation"
            ));
        }
    }
}

/// The comment lines right above line `at` (trimmed), top first.
fn comment_above<'a>(lines: &[&'a str], at: usize) -> Vec<&'a str> {
    let mut block: Vec<&str> = lines[..at]
        .iter()
        .rev()
        .map(|l| l.trim())
        .take_while(|l| l.starts_with("//"))
        .collect();
    block.reverse();
    block
}

/// The problems of one proto file's text; and how many rpcs it has.
fn check_proto(name: &str, text: &str) -> (Vec<String>, usize) {
    let lines: Vec<&str> = text.lines().collect();
    let mut problems = Vec::new();
    let mut rpcs = 0;
    for (i, line) in lines.iter().enumerate() {
        let trimmed = line.trim();
        if let Some(rest) = trimmed.strip_prefix("rpc ") {
            rpcs += 1;
            let rpc = rest.split('(').next().unwrap_or(rest).trim();
            let what = format!("{name}:{} rpc {rpc}", i + 1);
            let block = comment_above(&lines, i);
            match block.iter().position(|l| l.starts_with("// Errors")) {
                None => problems.push(format!("{what}: no `// Errors` comment above it")),
                Some(at) if block[at] == RPC_NONE => {
                    if at + 1 != block.len() {
                        problems.push(format!("{what}: lines after {RPC_NONE:?}"));
                    }
                }
                Some(at) if block[at] == RPC_HEADER => {
                    check_reasons(&block[at + 1..], &what, &mut problems)
                }
                Some(at) => problems.push(format!(
                    "{what}: {:?} is neither {RPC_HEADER:?} nor {RPC_NONE:?}",
                    block[at]
                )),
            }
        } else if let Some(rest) = trimmed.strip_prefix("service ") {
            let service = rest.trim_end_matches('{').trim();
            let what = format!("{name}:{} service {service}", i + 1);
            let block = comment_above(&lines, i);
            if !block.iter().any(|l| l.contains("docs/auth.md")) {
                problems.push(format!(
                    "{what}: the comment does not point to docs/auth.md"
                ));
            }
            match block.iter().position(|l| *l == SERVICE_HEADER) {
                None => problems.push(format!("{what}: no {SERVICE_HEADER:?} in its comment")),
                Some(at) => check_reasons(&block[at + 1..], &what, &mut problems),
            }
        }
    }
    (problems, rpcs)
}

fn protos(dir: &Path, out: &mut Vec<PathBuf>) {
    for entry in std::fs::read_dir(dir).expect("proto directory is readable") {
        let path = entry.expect("directory entry").path();
        if path.is_dir() {
            protos(&path, out);
        } else if path.extension().is_some_and(|e| e == "proto") {
            out.push(path);
        }
    }
}

#[test]
fn every_rpc_lists_its_errors() {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("imagefleet");
    let mut files = Vec::new();
    protos(&root, &mut files);
    files.sort();
    let mut problems = Vec::new();
    let mut rpcs = 0;
    for file in &files {
        let text = std::fs::read_to_string(file).expect("proto file is readable");
        let name = file
            .strip_prefix(&root)
            .unwrap_or(file)
            .display()
            .to_string();
        let (found, n) = check_proto(&name, &text);
        problems.extend(found);
        rpcs += n;
    }
    for service in [
        "region/v1/region.proto",
        "catalog/v1/catalog.proto",
        "sharing/v1/sharing.proto",
    ] {
        assert!(
            files.iter().any(|f| f.ends_with(service)),
            "{service} was not found under {}",
            root.display()
        );
    }
    assert!(rpcs >= 38, "only {rpcs} rpc lines found");
    assert!(problems.is_empty(), "{}", problems.join("\n"));
}

#[test]
fn the_check_refuses_rpcs_without_errors_and_malformed_reasons() {
    let proto = "\
// Calls. docs/auth.md
//
// Errors every call can get, not repeated under each rpc:
//   UNAUTHENTICATED AuthFailure.SignatureFailure: bad signature.
service S {
  // Does a thing.
  rpc Bare(A) returns (B);
  // Errors (besides those every call can get, see the service comment):
  //   NOT_FOUND InvalidImageId.NotFound: no such image,
  //     or not visible.
  rpc Good(A) returns (B);
  // Errors (besides those every call can get, see the service comment):
  //   NOTFOUND InvalidImageId.NotFound: wrong code.
  rpc BadCode(A) returns (B);
  // Errors: none besides those every call can get (see the service comment).
  rpc None(A) returns (B);
}
service T {
  rpc Other(A) returns (B);
}
";
    let (problems, rpcs) = check_proto("t.proto", proto);
    assert_eq!(rpcs, 5);
    let about = |what: &str| problems.iter().filter(|p| p.contains(what)).count();
    assert_eq!(about("rpc Bare"), 1, "{problems:#?}");
    assert_eq!(about("rpc Good"), 0, "{problems:#?}");
    assert!(about("rpc BadCode") >= 1, "{problems:#?}");
    assert_eq!(about("rpc None"), 0, "{problems:#?}");
    assert_eq!(about("rpc Other"), 1, "{problems:#?}");
    assert_eq!(about("service S"), 0, "{problems:#?}");
    assert_eq!(about("service T"), 2, "{problems:#?}");
}
