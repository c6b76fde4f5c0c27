//! A minimal QMP (QEMU Machine Protocol) client: line-delimited JSON over a Unix socket.
//! Asynchronous events QEMU interleaves with replies are skipped.

use std::path::{Path, PathBuf};
use std::time::Duration;

use serde_json::{Value, json};
use tokio::io::{AsyncBufReadExt, AsyncWriteExt, BufReader};
use tokio::net::UnixStream;
use tokio::net::unix::{OwnedReadHalf, OwnedWriteHalf};

use crate::VmmError;

/// How long one QMP command may take before it counts as failed.
const QMP_COMMAND_TIMEOUT: Duration = Duration::from_secs(10);

/// A QMP connection in command mode.
#[derive(Debug)]
pub(crate) struct Qmp {
    socket: PathBuf,
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
}

impl Qmp {
    /// Reads the greeting and enters command mode.
    pub(crate) async fn negotiate(socket: &Path, stream: UnixStream) -> Result<Qmp, VmmError> {
        let (reader, writer) = stream.into_split();
        let mut qmp = Qmp {
            socket: socket.to_owned(),
            reader: BufReader::new(reader),
            writer,
        };
        // QEMU serves one QMP client at a time; a second one waits without a greeting.
        let greeting = tokio::time::timeout(QMP_COMMAND_TIMEOUT, qmp.read_value("greeting")).await;
        greeting.map_err(|_| {
            qmp.error(
                "greeting",
                format!("no greeting within {QMP_COMMAND_TIMEOUT:?}; is another client connected?"),
            )
        })??;
        qmp.execute("qmp_capabilities", None).await?;
        Ok(qmp)
    }

    /// Runs one command and returns its `return` value.
    pub(crate) async fn execute(
        &mut self,
        command: &str,
        arguments: Option<Value>,
    ) -> Result<Value, VmmError> {
        let request = match arguments {
            Some(arguments) => json!({ "execute": command, "arguments": arguments }),
            None => json!({ "execute": command }),
        };
        let mut line = request.to_string();
        line.push('\n');
        let sent = self.writer.write_all(line.as_bytes()).await;
        sent.map_err(|error| self.error(command, error.to_string()))?;

        let reply = tokio::time::timeout(QMP_COMMAND_TIMEOUT, self.read_reply(command)).await;
        let reply = reply.map_err(|_| {
            self.error(command, format!("no reply within {QMP_COMMAND_TIMEOUT:?}"))
        })??;
        if let Some(error) = reply.get("error") {
            let description = error
                .get("desc")
                .and_then(Value::as_str)
                .unwrap_or("unknown error");
            return Err(self.error(command, description.to_owned()));
        }
        Ok(reply.get("return").cloned().unwrap_or(Value::Null))
    }

    async fn read_reply(&mut self, command: &str) -> Result<Value, VmmError> {
        loop {
            let value = self.read_value(command).await?;
            if value.get("event").is_none() {
                return Ok(value);
            }
        }
    }

    async fn read_value(&mut self, command: &str) -> Result<Value, VmmError> {
        let mut line = String::new();
        let read = self.reader.read_line(&mut line).await;
        match read {
            Ok(0) => Err(self.error(command, "QEMU closed the socket".to_owned())),
            Ok(_) => serde_json::from_str(&line)
                .map_err(|error| self.error(command, format!("invalid reply {line:?}: {error}"))),
            Err(error) => Err(self.error(command, error.to_string())),
        }
    }

    fn error(&self, command: &str, message: String) -> VmmError {
        VmmError::Qmp {
            command: command.to_owned(),
            socket: self.socket.clone(),
            message,
        }
    }
}
