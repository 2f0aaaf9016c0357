//! The CLI side of the control socket.

use std::{
    io,
    path::{Path, PathBuf},
};

use tokio::{
    io::{AsyncBufReadExt, AsyncWriteExt, BufReader},
    net::{
        unix::{OwnedReadHalf, OwnedWriteHalf},
        UnixStream,
    },
};

use super::protocol::{EventFilter, Request, Response, StreamItem};

#[derive(Debug, thiserror::Error)]
pub enum ClientError {
    #[error("cannot connect to the rampart daemon at {path} (is it running? are you root?)")]
    Connect {
        path: PathBuf,
        #[source]
        source: io::Error,
    },
    #[error("control socket I/O failed")]
    Io(#[from] io::Error),
    #[error("the daemon closed the connection")]
    Closed,
    #[error("the daemon sent a line that is not a valid {what}")]
    Decode {
        what: &'static str,
        #[source]
        source: serde_json::Error,
    },
    #[error("cannot encode the request")]
    Encode(#[source] serde_json::Error),
    #[error("daemon: {0}")]
    Refused(String),
}

/// One connection to the daemon; requests are answered in order.
pub struct Client {
    reader: BufReader<OwnedReadHalf>,
    writer: OwnedWriteHalf,
    line: String,
}

impl Client {
    pub async fn connect(path: &Path) -> Result<Client, ClientError> {
        let stream = UnixStream::connect(path)
            .await
            .map_err(|source| ClientError::Connect {
                path: path.to_owned(),
                source,
            })?;
        let (r, w) = stream.into_split();
        Ok(Client {
            reader: BufReader::new(r),
            writer: w,
            line: String::new(),
        })
    }

    /// Sends one request and returns the daemon's response (which may be `ok: false`).
    pub async fn request(&mut self, req: &Request) -> Result<Response, ClientError> {
        let mut line = serde_json::to_vec(req).map_err(ClientError::Encode)?;
        line.push(b'\n');
        self.writer.write_all(&line).await?;
        self.read_line().await?;
        serde_json::from_str(&self.line).map_err(|source| ClientError::Decode {
            what: "response",
            source,
        })
    }

    async fn read_line(&mut self) -> Result<(), ClientError> {
        self.line.clear();
        if self.reader.read_line(&mut self.line).await? == 0 {
            return Err(ClientError::Closed);
        }
        Ok(())
    }

    /// Subscribes to datapath events; the connection then carries only the event stream.
    pub async fn subscribe(mut self, filter: EventFilter) -> Result<Subscription, ClientError> {
        let resp = self.request(&Request::EventsSubscribe { filter }).await?;
        if !resp.ok {
            return Err(ClientError::Refused(
                resp.error.unwrap_or_else(|| "subscription refused".into()),
            ));
        }
        Ok(Subscription { client: self })
    }
}

/// A live event stream; dropping it disconnects.
pub struct Subscription {
    client: Client,
}

impl Subscription {
    /// The next event (or lag notice); `None` when the daemon closed the stream.
    pub async fn next(&mut self) -> Result<Option<StreamItem>, ClientError> {
        match self.client.read_line().await {
            Err(ClientError::Closed) => Ok(None),
            Err(e) => Err(e),
            Ok(()) => serde_json::from_str(&self.client.line)
                .map(Some)
                .map_err(|source| ClientError::Decode {
                    what: "event",
                    source,
                }),
        }
    }
}
