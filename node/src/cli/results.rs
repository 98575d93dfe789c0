//! `impetus results S`: a stream's results as JSON lines, like impetus v2's
//! per-stage `.ok` / `.err` files (plain JSON instead of base64 zlib).

use std::fs::File;
use std::io::{BufWriter, Write as _};
use std::path::PathBuf;

use anyhow::Context as _;
use impetus_proto::ids::{JobId, StreamName};
use impetus_proto::records::{ErrorKind, ErrorRecord, JobRecord, JobStatus};

use super::util::json_bytes;
use super::{connect, exit, print_json, with_stream_hint, Global};

/// Jobs asked for per request (results can be large: keep answers small;
/// the peer also returns fewer when their records pass its byte budget).
const PAGE: u32 = 256;

#[derive(Debug, clap::Args)]
#[command(after_help = "\
Each line of S.ok is one Succeeded job: {id, stream, status, args, input, result, attempts, peer, \
created_at, updated_at, stderr_tail}; input and result are text, or base64 under input_b64 / \
result_b64 when not UTF-8. Each line of S.err is one Dead job with the same fields and \
error: {kind, error, name, linenumber, statement}. Times are milliseconds since the epoch.")]
pub struct ResultsArgs {
    /// The stream.
    pub stream: StreamName,
    /// The directory to write S.ok and S.err into (created if missing).
    #[arg(long, default_value = ".", value_name = "DIR")]
    pub out: PathBuf,
}

/// The error record with the seeds' field names.
pub fn error_json(e: &ErrorRecord) -> serde_json::Value {
    let (kind, code) = match &e.kind {
        ErrorKind::Trap => ("trap", None),
        ErrorKind::Timeout => ("timeout", None),
        ErrorKind::OutOfMemory => ("out_of_memory", None),
        ErrorKind::Exit(c) => ("exit", Some(*c)),
        ErrorKind::LeaseExpired => ("lease_expired", None),
        ErrorKind::Module => ("module", None),
        ErrorKind::Other => ("other", None),
    };
    let mut v = serde_json::json!({
        "kind": kind,
        "error": e.error,
        "name": e.name,
        "linenumber": e.line,
        "statement": e.statement,
    });
    if let (Some(c), Some(o)) = (code, v.as_object_mut()) {
        o.insert("exit_code".into(), c.into());
    }
    v
}

/// One line of S.ok or S.err.
pub fn result_line(j: &JobRecord) -> String {
    let mut o = serde_json::Map::new();
    o.insert("id".into(), j.id.0.into());
    o.insert("stream".into(), j.stream.as_str().into());
    o.insert("status".into(), j.status.to_string().into());
    o.insert("args".into(), j.spec.args.clone().into());
    json_bytes(&mut o, "input", &j.spec.input);
    if let Some(r) = &j.result {
        json_bytes(&mut o, "result", r);
    }
    if let Some(e) = &j.error {
        o.insert("error".into(), error_json(e));
    }
    o.insert("attempts".into(), j.attempts.into());
    o.insert("peer".into(), j.peer.map(|p| p.0).into());
    o.insert("created_at".into(), j.created_at.0.into());
    o.insert("updated_at".into(), j.updated_at.0.into());
    json_bytes(&mut o, "stderr_tail", &j.stderr_tail);
    serde_json::Value::Object(o).to_string()
}

pub async fn run(g: &Global, args: ResultsArgs) -> anyhow::Result<u8> {
    let client = connect(g).await?;
    let info = client.stream(&args.stream).await.map_err(with_stream_hint)?;
    std::fs::create_dir_all(&args.out).with_context(|| format!("creating {}", args.out.display()))?;
    let mut counts = [0u64; 2];
    let mut paths = Vec::new();
    for (i, (status, ext)) in [(JobStatus::Succeeded, "ok"), (JobStatus::Dead, "err")].into_iter().enumerate() {
        let path = args.out.join(format!("{}.{ext}", args.stream));
        let file = File::create(&path).with_context(|| format!("creating {}", path.display()))?;
        let mut w = BufWriter::new(file);
        let mut after: Option<JobId> = None;
        loop {
            let page = client
                .jobs(Some(&args.stream), Some(status), after, PAGE)
                .await
                .with_context(|| format!("listing the {status} jobs of {}", args.stream))?;
            for j in &page {
                writeln!(w, "{}", result_line(j)).with_context(|| format!("writing {}", path.display()))?;
            }
            counts[i] += page.len() as u64;
            // A page may be short (the peer bounds its size in bytes): only
            // an empty one is the end.
            let Some(last) = page.last() else { break };
            after = Some(last.id);
        }
        w.flush().with_context(|| format!("writing {}", path.display()))?;
        paths.push(path);
    }
    let live = info.stats.live();
    if g.json {
        print_json(&serde_json::json!({
            "stream": args.stream.as_str(),
            "ok": counts[0],
            "err": counts[1],
            "ok_file": paths[0].display().to_string(),
            "err_file": paths[1].display().to_string(),
            "not_finished": live,
            "cancelled": info.stats.cancelled,
        }))?;
    } else {
        println!("{} succeeded -> {}", counts[0], paths[0].display());
        println!("{} dead      -> {}", counts[1], paths[1].display());
        if live > 0 {
            println!("{live} jobs have not finished yet");
        }
    }
    Ok(exit::OK)
}

#[cfg(test)]
pub(crate) mod tests {
    use super::*;
    use impetus_proto::ids::{ModuleHash, PeerId, Timestamp};
    use impetus_proto::records::JobSpec;

    pub(crate) fn record(id: u64, status: JobStatus) -> JobRecord {
        let ok = status == JobStatus::Succeeded;
        JobRecord {
            id: JobId(id),
            stream: StreamName::new("s1").unwrap(),
            module: ModuleHash::of(b"m"),
            spec: JobSpec {
                args: vec!["-v".into()],
                env: vec![],
                input: if ok { b"7".to_vec() } else { b"x".to_vec() },
            },
            priority: 0,
            status,
            ready_at: Timestamp(10),
            attempts: if ok { 1 } else { 3 },
            lease: None,
            peer: Some(PeerId(1)),
            created_at: Timestamp(10),
            updated_at: Timestamp(20),
            key: None,
            result: ok.then(|| b"49\n".to_vec()),
            error: (!ok).then(|| ErrorRecord {
                kind: ErrorKind::Exit(2),
                error: "exit code 2".into(),
                name: "square.wasm".into(),
                line: None,
                statement: None,
            }),
            stdout_tail: vec![],
            stderr_tail: vec![],
        }
    }

    #[test]
    fn ok_lines() {
        expect_test::expect![[r#"{"args":["-v"],"attempts":1,"created_at":10,"id":1,"input":"7","peer":1,"result":"49\n","status":"Succeeded","stderr_tail":"","stream":"s1","updated_at":20}"#]]
        .assert_eq(&result_line(&record(1, JobStatus::Succeeded)));
    }

    #[test]
    fn err_lines_carry_the_error_record() {
        expect_test::expect![[r#"{"args":["-v"],"attempts":3,"created_at":10,"error":{"error":"exit code 2","exit_code":2,"kind":"exit","linenumber":null,"name":"square.wasm","statement":null},"id":2,"input":"x","peer":1,"status":"Dead","stderr_tail":"","stream":"s1","updated_at":20}"#]]
        .assert_eq(&result_line(&record(2, JobStatus::Dead)));
    }

    #[test]
    fn binary_results_are_base64() {
        let mut j = record(3, JobStatus::Succeeded);
        j.result = Some(vec![0xff, 0xfe]);
        let v: serde_json::Value = serde_json::from_str(&result_line(&j)).unwrap();
        assert_eq!(v["result_b64"], "//4=");
        assert!(v.get("result").is_none());
    }
}
