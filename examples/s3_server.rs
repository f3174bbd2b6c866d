//! An S3-compatible server on loopback for the object-storage tests and the
//! `bench data` comparison: `s3s-fs` (buckets are directories under ROOT,
//! objects files), behind hyper.
//!
//! ```text
//! cargo run --release --example s3_server -- ROOT [--port 9000] [--access-key AK --secret-key SK]
//! ```
//!
//! Prints `listening on http://127.0.0.1:PORT` once it accepts connections.
//! Killing the process drops every open connection, as a crashed server does.

use std::path::PathBuf;

use hyper_util::rt::{TokioExecutor, TokioIo};
use hyper_util::server::conn::auto::Builder as ConnBuilder;
use s3s::auth::SimpleAuth;
use s3s::service::S3ServiceBuilder;

struct Args {
    root: PathBuf,
    port: u16,
    keys: Option<(String, String)>,
}

fn parse_args() -> Result<Args, String> {
    let mut root = None;
    let mut port = 0u16;
    let (mut access, mut secret) = (None, None);
    let mut args = std::env::args().skip(1);
    while let Some(arg) = args.next() {
        let mut value = |name: &str| args.next().ok_or(format!("{name} needs a value"));
        match arg.as_str() {
            "--port" => port = value("--port")?.parse().map_err(|e| format!("--port: {e}"))?,
            "--access-key" => access = Some(value("--access-key")?),
            "--secret-key" => secret = Some(value("--secret-key")?),
            other if other.starts_with("--") => return Err(format!("unknown option {other}")),
            other => root = Some(PathBuf::from(other)),
        }
    }
    let keys = match (access, secret) {
        (Some(a), Some(s)) => Some((a, s)),
        (None, None) => None,
        _ => return Err("--access-key and --secret-key go together".into()),
    };
    let root = root.ok_or("usage: s3_server ROOT [--port P] [--access-key AK --secret-key SK]")?;
    Ok(Args { root, port, keys })
}

#[tokio::main(flavor = "multi_thread", worker_threads = 2)]
async fn main() -> Result<(), Box<dyn std::error::Error>> {
    let args = parse_args()?;
    std::fs::create_dir_all(&args.root)?;
    let fs = s3s_fs::FileSystem::new(&args.root).map_err(|e| format!("{}: {e:?}", args.root.display()))?;
    let mut builder = S3ServiceBuilder::new(fs);
    if let Some((access, secret)) = args.keys {
        builder.set_auth(SimpleAuth::from_single(access, secret));
    }
    let service = builder.build();
    let listener = tokio::net::TcpListener::bind(("127.0.0.1", args.port)).await?;
    println!("listening on http://{}", listener.local_addr()?);
    let http = ConnBuilder::new(TokioExecutor::new());
    loop {
        let (socket, _) = match listener.accept().await {
            Ok(conn) => conn,
            Err(e) => {
                eprintln!("accept: {e}");
                continue;
            }
        };
        let conn = http
            .serve_connection(TokioIo::new(socket), service.clone())
            .into_owned();
        tokio::spawn(async move {
            let _ = conn.await;
        });
    }
}
