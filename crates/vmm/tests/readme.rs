//! README.md's command blocks, run verbatim: the README can never drift from what esvm does.
//!
//! Every fenced block tagged `sh` is a runnable example. The blocks run in order, each as one
//! `bash -euo pipefail` script, in one scratch directory they share (a platform created by one
//! block is there for the next), with the `esvm` under test first on `PATH`. A script's
//! background jobs (`esvm run ... &`) are waited for and must succeed too. Blocks tagged
//! `text` (synopses, output) are not run.
//!
//! An HTML comment right before a block can adjust how it runs; nothing else is changed:
//!
//! ```text
//! <!-- readme-test: skip REASON -->                 not run; printed as "skipped: REASON"
//! <!-- readme-test: replace "FROM" "TO" -->         run with FROM replaced by TO (e.g. a
//!                                                   shorter guest); FROM must occur
//! <!-- readme-test: linux-assets -->                bzImage and initrd.cpio in the scratch
//!                                                   directory are Debian's kernel and
//!                                                   esvm's busybox initramfs
//! <!-- readme-test: status N -->                    the block ends with status N (default 0)
//! <!-- readme-test: timeout SECS -->                default 120
//! ```
//!
//! Several directives go in one comment, separated by `;`.

use std::os::unix::process::CommandExt;
use std::path::{Path, PathBuf};
use std::process::{Command, Stdio};
use std::time::{Duration, Instant};

const ESVM: &str = env!("CARGO_BIN_EXE_esvm");
const DIRECTIVE: &str = "<!-- readme-test:";

/// One fenced block of README.md.
#[derive(Debug, Default, Clone, PartialEq)]
struct Block {
    /// 1-based line of the opening fence.
    line: usize,
    lang: String,
    text: String,
    skip: Option<String>,
    replace: Vec<(String, String)>,
    linux_assets: bool,
    status: i32,
    timeout: Option<u64>,
}

impl Block {
    /// The script to run: the block with its replacements applied.
    fn script(&self) -> Result<String, String> {
        let mut s = self.text.clone();
        for (from, to) in &self.replace {
            if !s.contains(from.as_str()) {
                return Err(format!(
                    "README block at line {}: replace {from:?}: not in the block",
                    self.line
                ));
            }
            s = s.replace(from.as_str(), to);
        }
        Ok(s)
    }
}

/// The quoted arguments of a `replace` directive.
fn quoted(s: &str) -> Result<Vec<String>, String> {
    let mut out = Vec::new();
    let mut rest = s.trim();
    while !rest.is_empty() {
        let Some(r) = rest.strip_prefix('"') else {
            return Err(format!("expected a quoted string at {rest:?}"));
        };
        let end = r
            .find('"')
            .ok_or_else(|| format!("unterminated string at {rest:?}"))?;
        out.push(r[..end].to_string());
        rest = r[end + 1..].trim_start();
    }
    Ok(out)
}

fn apply_directives(block: &mut Block, comment: &str) -> Result<(), String> {
    for d in comment.split(';').map(str::trim).filter(|d| !d.is_empty()) {
        let (key, arg) = d.split_once(' ').unwrap_or((d, ""));
        let arg = arg.trim();
        match key {
            "skip" if !arg.is_empty() => block.skip = Some(arg.to_string()),
            "skip" => return Err("skip needs a reason".into()),
            "replace" => match quoted(arg)?.as_slice() {
                [from, to] => block.replace.push((from.clone(), to.clone())),
                _ => return Err(format!("replace needs \"FROM\" \"TO\", got {arg:?}")),
            },
            "linux-assets" => block.linux_assets = true,
            "status" => block.status = arg.parse().map_err(|e| format!("status {arg:?}: {e}"))?,
            "timeout" => {
                block.timeout = Some(arg.parse().map_err(|e| format!("timeout {arg:?}: {e}"))?)
            }
            other => return Err(format!("unknown directive {other:?}")),
        }
    }
    Ok(())
}

/// The fenced blocks of a Markdown text, with the directives of the comment before each.
fn parse(markdown: &str) -> Result<Vec<Block>, String> {
    let mut blocks = Vec::new();
    let mut pending: Option<(usize, String)> = None;
    let mut open: Option<Block> = None;
    for (i, line) in markdown.lines().enumerate() {
        let n = i + 1;
        if let Some(b) = open.as_mut() {
            if line.trim_start().starts_with("```") {
                blocks.push(open.take().expect("a block is open"));
            } else {
                b.text.push_str(line);
                b.text.push('\n');
            }
            continue;
        }
        if let Some(rest) = line.trim().strip_prefix("```") {
            let mut b = Block {
                line: n,
                lang: rest.trim().to_string(),
                ..Block::default()
            };
            if let Some((at, comment)) = pending.take() {
                apply_directives(&mut b, &comment)
                    .map_err(|e| format!("README.md line {at}: {e}"))?;
            }
            open = Some(b);
        } else if let Some(rest) = line.trim().strip_prefix(DIRECTIVE) {
            let body = rest
                .strip_suffix("-->")
                .ok_or_else(|| format!("README.md line {n}: a directive ends with -->"))?;
            pending = Some((n, body.trim().to_string()));
        } else if !line.trim().is_empty() {
            if let Some((at, _)) = pending {
                return Err(format!(
                    "README.md line {at}: the directive is not right before a fenced block"
                ));
            }
        }
    }
    if let Some(b) = open {
        return Err(format!("README.md line {}: unterminated block", b.line));
    }
    Ok(blocks)
}

/// Debian's kernel and esvm's initramfs (scripts/linux-assets.sh, cached).
fn linux_assets() -> (PathBuf, PathBuf) {
    let root = Path::new(env!("CARGO_MANIFEST_DIR")).join("../..");
    let out = Command::new(root.join("scripts/linux-assets.sh"))
        .stderr(Stdio::inherit())
        .output()
        .expect("cannot run scripts/linux-assets.sh");
    assert!(out.status.success(), "scripts/linux-assets.sh failed");
    let text = String::from_utf8_lossy(&out.stdout).into_owned();
    let get = |key: &str| -> PathBuf {
        text.lines()
            .find_map(|l| l.strip_prefix(&format!("{key}=")))
            .unwrap_or_else(|| panic!("linux-assets.sh printed no {key}: {text}"))
            .into()
    };
    (get("ESVM_LINUX_KERNEL"), get("ESVM_LINUX_INITRD"))
}

/// Runs `script` in `dir` as its own process group; kills the group when it is done or at
/// the timeout. Returns the status (None: timed out), stdout and stderr.
fn run_script(script: &str, dir: &Path, timeout: Duration) -> (Option<i32>, String, String) {
    // Background jobs are waited for one by one, so that a failing one fails the block.
    let full = format!("{script}\nfor job in $(jobs -p); do wait \"$job\"; done\n");
    let bin_dir = Path::new(ESVM)
        .parent()
        .expect("the binary has a directory");
    let path = format!(
        "{}:{}",
        bin_dir.display(),
        std::env::var("PATH").unwrap_or_default()
    );
    let out_path = dir.join(".readme-test.out");
    let err_path = dir.join(".readme-test.err");
    let mut child = Command::new("bash")
        .args(["-euo", "pipefail", "-c", &full])
        .current_dir(dir)
        .env("PATH", path)
        .env_remove("ESVM_API_SOCKET")
        .stdin(Stdio::null())
        .stdout(std::fs::File::create(&out_path).expect("scratch file"))
        .stderr(std::fs::File::create(&err_path).expect("scratch file"))
        .process_group(0)
        .spawn()
        .expect("cannot start bash");
    let start = Instant::now();
    let status = loop {
        if let Some(s) = child.try_wait().expect("wait for bash") {
            break s.code().or(Some(-1));
        }
        if start.elapsed() > timeout {
            break None;
        }
        std::thread::sleep(Duration::from_millis(50));
    };
    // Whatever the block left running (a VM it did not stop) goes with it.
    // SAFETY: kill(2) on our own child's process group; no memory is involved.
    unsafe {
        libc::kill(-(child.id() as i32), libc::SIGKILL);
    }
    let _ = child.wait();
    let read = |p: &Path| std::fs::read_to_string(p).unwrap_or_default();
    (status, read(&out_path), read(&err_path))
}

#[test]
fn every_command_block_of_the_readme_runs_verbatim() {
    let readme = Path::new(env!("CARGO_MANIFEST_DIR")).join("../../README.md");
    let text = std::fs::read_to_string(&readme).expect("README.md");
    let blocks = parse(&text).unwrap_or_else(|e| panic!("{e}"));
    let runnable: Vec<&Block> = blocks.iter().filter(|b| b.lang == "sh").collect();
    assert!(
        runnable.len() >= 5,
        "README.md has only {} `sh` blocks: the examples must be tagged `sh` to be tested",
        runnable.len()
    );
    let scratch = tempfile::tempdir().expect("scratch directory");
    let mut ran = 0;
    for b in runnable {
        if let Some(reason) = &b.skip {
            println!("skipped: README block at line {}: {reason}", b.line);
            continue;
        }
        let script = b.script().unwrap_or_else(|e| panic!("{e}"));
        if b.linux_assets {
            let (kernel, initrd) = linux_assets();
            for (name, target) in [("bzImage", kernel), ("initrd.cpio", initrd)] {
                let link = scratch.path().join(name);
                let _ = std::fs::remove_file(&link);
                std::os::unix::fs::symlink(target, link).expect("link a Linux asset");
            }
        }
        let started = Instant::now();
        let timeout = Duration::from_secs(b.timeout.unwrap_or(120));
        let (status, out, err) = run_script(&script, scratch.path(), timeout);
        let shown = || {
            format!(
                "README block at line {}:\n{script}\n--- stdout:\n{out}\n--- stderr:\n{err}",
                b.line
            )
        };
        match status {
            None => panic!("timed out after {timeout:?}: {}", shown()),
            Some(s) if s != b.status => {
                panic!("ended with status {s}, expected {}: {}", b.status, shown())
            }
            Some(_) => {}
        }
        println!(
            "README block at line {}: ok in {:.1} s",
            b.line,
            started.elapsed().as_secs_f64()
        );
        ran += 1;
    }
    assert!(ran > 0, "no README block ran");
}

#[test]
fn directives_are_parsed_and_misuse_is_refused() {
    let md = "text\n<!-- readme-test: replace \"a b\" \"c\"; status 3; timeout 9 -->\n```sh\nrun a b\n```\n\n```text\nsynopsis\n```\n";
    let blocks = parse(md).unwrap();
    assert_eq!(blocks.len(), 2);
    assert_eq!(blocks[0].lang, "sh");
    assert_eq!(blocks[0].line, 3);
    assert_eq!(blocks[0].status, 3);
    assert_eq!(blocks[0].timeout, Some(9));
    assert_eq!(blocks[0].script().unwrap(), "run c\n");
    assert_eq!(blocks[1].lang, "text");
    assert!(blocks[1].replace.is_empty());

    let missing = "<!-- readme-test: replace \"zzz\" \"y\" -->\n```sh\nrun a\n```\n";
    assert!(parse(missing).unwrap()[0].script().is_err());
    for bad in [
        "<!-- readme-test: skip -->\n```sh\nx\n```\n",
        "<!-- readme-test: frobnicate -->\n```sh\nx\n```\n",
        "<!-- readme-test: status x -->\n```sh\nx\n```\n",
        "<!-- readme-test: skip why -->\nsome prose\n```sh\nx\n```\n",
        "```sh\nnever closed\n",
    ] {
        assert!(parse(bad).is_err(), "accepted: {bad:?}");
    }
}

#[test]
fn a_failing_block_fails_and_background_jobs_count() {
    let dir = tempfile::tempdir().unwrap();
    let t = Duration::from_secs(20);
    assert_eq!(run_script("true", dir.path(), t).0, Some(0));
    assert_eq!(run_script("false; echo after", dir.path(), t).0, Some(1));
    // A background job that fails fails the block, after the foreground finished.
    assert_eq!(
        run_script("(sleep 0.2; exit 7) &\necho fg", dir.path(), t).0,
        Some(7)
    );
    // The esvm under test is first on PATH.
    let (s, out, _) = run_script("command -v esvm", dir.path(), t);
    assert_eq!(s, Some(0));
    assert_eq!(out.trim(), ESVM);
    assert_eq!(
        run_script("sleep 30", dir.path(), Duration::from_millis(300)).0,
        None
    );
}
