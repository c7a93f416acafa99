//! The client side of the agent's observability API: one HTTP/1.1 GET over any stream (TCP on
//! the node, or the agent's unix socket), the response read to its end.

use std::io::{BufRead, BufReader, Read, Write};

use crate::record::Flow;

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("talking to the agent: {0}")]
    Io(#[from] std::io::Error),
    #[error("the agent answered {status}: {body}")]
    Status { status: String, body: String },
    #[error("the agent sent a malformed response: {0}")]
    Malformed(String),
    #[error("the agent sent a flow that does not decode: {0}")]
    Decode(#[from] serde_json::Error),
}

/// Sends `GET path` and returns a reader positioned at the body once the status is 200.
pub fn request<S: Read + Write>(mut stream: S, path: &str) -> Result<BufReader<S>, ClientError> {
    write!(
        stream,
        "GET {path} HTTP/1.1\r\nHost: ferrum-agent\r\nConnection: close\r\n\r\n"
    )?;
    stream.flush()?;
    let mut reader = BufReader::new(stream);
    let mut status = String::new();
    reader.read_line(&mut status)?;
    let code = status
        .split_whitespace()
        .nth(1)
        .ok_or_else(|| ClientError::Malformed(format!("status line {status:?}")))?
        .to_string();
    loop {
        let mut h = String::new();
        if reader.read_line(&mut h)? == 0 || h == "\r\n" || h == "\n" {
            break;
        }
    }
    if code != "200" {
        let mut body = String::new();
        reader.read_to_string(&mut body)?;
        return Err(ClientError::Status {
            status: status.trim().to_string(),
            body: body.trim().to_string(),
        });
    }
    Ok(reader)
}

/// `GET path`, the whole body.
pub fn get<S: Read + Write>(stream: S, path: &str) -> Result<String, ClientError> {
    let mut reader = request(stream, path)?;
    let mut body = String::new();
    reader.read_to_string(&mut body)?;
    Ok(body)
}

/// One flow per non-empty line.
pub fn parse_flows(body: &str) -> Result<Vec<Flow>, ClientError> {
    body.lines()
        .filter(|l| !l.trim().is_empty())
        .map(|l| serde_json::from_str(l).map_err(ClientError::from))
        .collect()
}

#[cfg(test)]
mod tests {
    use super::*;

    /// A canned server response and a record of what was written.
    struct Fake {
        input: std::io::Cursor<Vec<u8>>,
        written: Vec<u8>,
    }
    impl Read for Fake {
        fn read(&mut self, buf: &mut [u8]) -> std::io::Result<usize> {
            self.input.read(buf)
        }
    }
    impl Write for Fake {
        fn write(&mut self, buf: &[u8]) -> std::io::Result<usize> {
            self.written.extend_from_slice(buf);
            Ok(buf.len())
        }
        fn flush(&mut self) -> std::io::Result<()> {
            Ok(())
        }
    }

    fn fake(response: &str) -> Fake {
        Fake {
            input: std::io::Cursor::new(response.as_bytes().to_vec()),
            written: Vec::new(),
        }
    }

    #[test]
    fn reads_the_body_of_a_200_and_reports_other_statuses() {
        let mut f = fake("HTTP/1.1 200 OK\r\nContent-Type: x\r\n\r\nhello\n");
        assert_eq!(get(&mut f, "/v1/flows?number=1").unwrap(), "hello\n");
        assert!(
            String::from_utf8_lossy(&f.written).starts_with("GET /v1/flows?number=1 HTTP/1.1\r\n")
        );
        let e = get(
            fake("HTTP/1.1 400 Bad Request\r\n\r\n--port \"x\": bad\n"),
            "/",
        )
        .unwrap_err();
        assert!(e.to_string().contains("--port"), "{e}");
        assert!(get(fake(""), "/").is_err());
        assert!(parse_flows("\n\n").unwrap().is_empty());
        assert!(parse_flows("{").is_err());
    }
}
