//! The client side of the control socket (`vmapple ctl`).

use std::collections::VecDeque;
use std::io::{self, BufReader, Write};
use std::os::unix::net::UnixStream;
use std::path::{Path, PathBuf};
use std::time::Duration;

use super::protocol::{
    parse_server_line, read_line_bounded, Event, LineRead, ProtocolError, Request, Response,
    ServerMessage, MAX_LINE,
};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("{}: {source}", path.display())]
    Io {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("{}: the VM closed the control connection", path.display())]
    Closed { path: PathBuf },
    #[error("{}: {source}", path.display())]
    Protocol {
        path: PathBuf,
        #[source]
        source: ProtocolError,
    },
}

/// A blocking control-socket client (`vmapple ctl`).
pub struct Client {
    path: PathBuf,
    reader: BufReader<UnixStream>,
    writer: UnixStream,
    events: VecDeque<Event>,
}

impl Client {
    pub fn connect(path: &Path) -> Result<Client, ClientError> {
        let io = |source| ClientError::Io {
            path: path.to_path_buf(),
            source,
        };
        let stream = UnixStream::connect(path).map_err(io)?;
        let writer = stream.try_clone().map_err(io)?;
        Ok(Client {
            path: path.to_path_buf(),
            reader: BufReader::new(stream),
            writer,
            events: VecDeque::new(),
        })
    }

    /// Bounds how long `call` and `next_event` wait (`None`: forever).
    pub fn set_timeout(&self, t: Option<Duration>) -> Result<(), ClientError> {
        self.reader
            .get_ref()
            .set_read_timeout(t)
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })
    }

    fn read_message(&mut self) -> Result<ServerMessage, ClientError> {
        let path = self.path.clone();
        match read_line_bounded(&mut self.reader, MAX_LINE) {
            Err(source) => Err(ClientError::Io { path, source }),
            Ok(LineRead::Eof) => Err(ClientError::Closed { path }),
            Ok(LineRead::TooLong(len)) => Err(ClientError::Protocol {
                path,
                source: ProtocolError::LineTooLong { len },
            }),
            Ok(LineRead::Line(line)) => {
                parse_server_line(&line).map_err(|source| ClientError::Protocol { path, source })
            }
        }
    }

    /// Sends `req` and waits for its reply; events arriving meanwhile are
    /// kept for [`Client::next_event`].
    pub fn call(&mut self, req: &Request) -> Result<Response, ClientError> {
        self.writer
            .write_all(req.to_line().as_bytes())
            .map_err(|source| ClientError::Io {
                path: self.path.clone(),
                source,
            })?;
        loop {
            match self.read_message()? {
                ServerMessage::Response(r) => return Ok(r),
                ServerMessage::Event(e) => self.events.push_back(e),
            }
        }
    }

    /// The next event (after a successful `subscribe`).
    pub fn next_event(&mut self) -> Result<Event, ClientError> {
        if let Some(e) = self.events.pop_front() {
            return Ok(e);
        }
        loop {
            match self.read_message()? {
                ServerMessage::Event(e) => return Ok(e),
                ServerMessage::Response(_) => continue,
            }
        }
    }
}

/// Connects, sends one request, returns its reply.
pub fn call(socket: &Path, req: &Request) -> Result<Response, ClientError> {
    let mut c = Client::connect(socket)?;
    c.set_timeout(Some(Duration::from_secs(30)))?;
    c.call(req)
}
