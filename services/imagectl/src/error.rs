//! What can go wrong in a command, and how it is reported: one line on stderr, exit code 1.

/// A failed command. Usage errors found by clap never get here: clap reports them itself
/// (exit code 2); those found after parsing are `Usage` (exit code 2 as well).
#[derive(Debug, thiserror::Error)]
pub enum CliError {
    /// The command line parses but asks for something the command does not do (an output
    /// format it does not print, a period that ends before it starts).
    #[error("{0}")]
    Usage(String),
    /// A service answered with an error status.
    #[error("{}", status_line(.0))]
    Status(#[from] tonic::Status),
    /// The cluster file, the account or the region chosen does not work.
    #[error("{0}")]
    Config(String),
    /// A local file could not be read or written.
    #[error("{what}: {source}")]
    Io {
        what: String,
        #[source]
        source: std::io::Error,
    },
    /// A service endpoint could not be used (a malformed URL in the cluster file).
    #[error("bad endpoint {url}: {source}")]
    Endpoint {
        url: String,
        #[source]
        source: tonic::transport::Error,
    },
    /// The operation ran but did not end well (an image that failed to build, a timeout,
    /// a server answer that makes no sense).
    #[error("{0}")]
    Failed(String),
}

impl CliError {
    /// The process exit code: 2 for usage errors, 1 for everything else.
    pub fn exit_code(&self) -> u8 {
        match self {
            CliError::Usage(_) => 2,
            _ => 1,
        }
    }

    pub fn io(what: impl Into<String>, source: std::io::Error) -> Self {
        CliError::Io {
            what: what.into(),
            source,
        }
    }
}

/// `<GRPC CODE NAME> <ErrorInfo reason>: <message>`, e.g.
/// `NotFound InvalidImageId.NotFound: image img-12345678 does not exist`.
fn status_line(status: &tonic::Status) -> String {
    let code = format!("{:?}", status.code());
    match imagefleet_proto::error::reason(status) {
        Some(reason) if !reason.is_empty() => format!("{code} {reason}: {}", status.message()),
        // Transport failures carry no reason; their causes say what happened.
        _ => {
            let mut line = format!("{code}: {}", status.message());
            let mut cause = std::error::Error::source(status);
            while let Some(err) = cause {
                let text = err.to_string();
                if !line.contains(&text) {
                    line.push_str(": ");
                    line.push_str(&text);
                }
                cause = err.source();
            }
            line
        }
    }
}

pub type Result<T, E = CliError> = std::result::Result<T, E>;

#[cfg(test)]
mod tests {
    use super::*;

    #[test]
    fn status_errors_name_code_and_reason() {
        let status = imagefleet_proto::error::status(
            tonic::Code::NotFound,
            "InvalidImageId.NotFound",
            "image img-12345678 does not exist",
        );
        assert_eq!(
            CliError::from(status).to_string(),
            "NotFound InvalidImageId.NotFound: image img-12345678 does not exist"
        );
    }

    #[test]
    fn status_errors_without_error_info_name_the_code() {
        let status = tonic::Status::unavailable("connection refused");
        assert_eq!(
            CliError::from(status).to_string(),
            "Unavailable: connection refused"
        );
    }
}
