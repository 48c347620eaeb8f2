//! One conformance suite for every `Store` backend: each case runs on SQLite and on
//! PostgreSQL. PostgreSQL comes from `UPDRAFT_TEST_POSTGRES_URL` or, failing that, a
//! throw-away cluster started with `scripts/pg-temp.sh`. Under `CI=true` a missing
//! PostgreSQL fails the suite; elsewhere its cases are skipped with a notice.

use std::collections::BTreeMap;
use std::sync::{Arc, OnceLock};
use updraft_protocol::job::OtaUpdateStatus;
use updraft_protocol::{ExecutionStatus, JobStatus, TargetSelection};
use updraft_server::store::*;

// ------------------------------------------------------------------ backends

async fn sqlite_store() -> Option<(SqlStore, tempdir::Guard)> {
    let dir = tempdir::Guard::new();
    let url = format!("sqlite://{}/t.db", dir.path.display());
    Some((SqlStore::connect(&url).await.expect("sqlite store"), dir))
}

/// The admin URL of the shared test PostgreSQL, started once per test binary.
fn postgres_admin_url() -> Option<String> {
    static URL: OnceLock<Option<String>> = OnceLock::new();
    URL.get_or_init(|| {
        if let Ok(url) = std::env::var("UPDRAFT_TEST_POSTGRES_URL") {
            return Some(url);
        }
        let script = concat!(env!("CARGO_MANIFEST_DIR"), "/../../scripts/pg-temp.sh");
        let dir = std::env::temp_dir().join(format!("updraft-pg-{}", std::process::id()));
        let out = std::process::Command::new(script)
            .arg("start")
            .arg(&dir)
            .output();
        match out {
            Ok(o) if o.status.success() => {
                let url = String::from_utf8_lossy(&o.stdout).trim().to_owned();
                // Stop the cluster when the test binary exits.
                tempdir::register_pg(script, dir);
                Some(url)
            }
            Ok(o) => {
                eprintln!(
                    "could not start PostgreSQL: {}",
                    String::from_utf8_lossy(&o.stderr)
                );
                None
            }
            Err(e) => {
                eprintln!("could not run {script}: {e}");
                None
            }
        }
    })
    .clone()
}

async fn postgres_store() -> Option<(SqlStore, tempdir::Guard)> {
    let Some(admin) = postgres_admin_url() else {
        assert!(
            std::env::var("CI").as_deref() != Ok("true"),
            "PostgreSQL is required under CI=true but could not be started"
        );
        eprintln!(
            "PostgreSQL unavailable: skipping (set UPDRAFT_TEST_POSTGRES_URL or install postgresql)"
        );
        return None;
    };
    let db = format!("conf_{}", uuid::Uuid::new_v4().simple());
    sqlx::any::install_default_drivers();
    let admin_pool = sqlx::AnyPool::connect(&admin)
        .await
        .expect("admin connection");
    sqlx::raw_sql(sqlx::AssertSqlSafe(format!("CREATE DATABASE {db}")))
        .execute(&admin_pool)
        .await
        .expect("create database");
    admin_pool.close().await;
    let url = match admin.rsplit_once('/') {
        Some((base, _)) => format!("{base}/{db}"),
        None => panic!("bad admin url {admin}"),
    };
    Some((
        SqlStore::connect(&url).await.expect("postgres store"),
        tempdir::Guard::new(),
    ))
}

mod tempdir {
    use std::path::PathBuf;

    pub struct Guard {
        pub path: PathBuf,
    }

    impl Guard {
        pub fn new() -> Self {
            let path = std::env::temp_dir()
                .join(format!("updraft-conf-{}", uuid::Uuid::new_v4().simple()));
            std::fs::create_dir_all(&path).expect("temp dir");
            Guard { path }
        }
    }

    impl Drop for Guard {
        fn drop(&mut self) {
            let _ = std::fs::remove_dir_all(&self.path);
        }
    }

    /// Stops the cluster once this test process has exited: a watchdog shell waits for it.
    pub fn register_pg(script: &str, dir: PathBuf) {
        let watchdog = format!(
            "while kill -0 {pid} 2>/dev/null; do sleep 1; done; '{script}' stop '{dir}'",
            pid = std::process::id(),
            dir = dir.display()
        );
        let _ = std::process::Command::new("sh")
            .arg("-c")
            .arg(watchdog)
            .stdin(std::process::Stdio::null())
            .stdout(std::process::Stdio::null())
            .stderr(std::process::Stdio::null())
            .spawn();
    }
}

// ------------------------------------------------------------------ fixtures

fn thing(name: &str) -> Thing {
    Thing {
        name: name.into(),
        id: uuid::Uuid::new_v4().to_string(),
        type_name: None,
        attributes: BTreeMap::from([("hw".to_owned(), "v1".to_owned())]),
        version: 1,
        created_ms: 1_000,
    }
}

fn group(name: &str, parent: Option<&str>) -> ThingGroup {
    ThingGroup {
        name: name.into(),
        id: uuid::Uuid::new_v4().to_string(),
        parent: parent.map(str::to_owned),
        description: None,
        attributes: BTreeMap::new(),
        version: 1,
        created_ms: 1_000,
    }
}

fn job(id: &str, selection: TargetSelection, targets: &[&str]) -> Job {
    Job {
        id: id.into(),
        status: JobStatus::InProgress,
        target_selection: selection,
        targets: targets.iter().map(|s| (*s).to_owned()).collect(),
        description: None,
        document: "{}".into(),
        document_source: None,
        namespace_id: None,
        details: serde_json::Map::new(),
        force_canceled: false,
        reason_code: None,
        comment: None,
        created_ms: 1_000,
        updated_ms: 1_000,
        completed_ms: None,
        version: 1,
    }
}

fn execution(job: &str, thing: &str) -> JobExecution {
    JobExecution::queued(job, thing, 1_000)
}

fn object(bucket: &str, key: &str, version: &str, blob: &str) -> ObjectVersion {
    ObjectVersion {
        bucket: bucket.into(),
        key: key.into(),
        version_id: version.into(),
        delete_marker: false,
        size: 3,
        etag: "\"e\"".into(),
        content_type: Some("application/octet-stream".into()),
        checksum: Some(StoredChecksum {
            algorithm: "crc32".into(),
            value: "AAAAAA==".into(),
        }),
        metadata: BTreeMap::new(),
        blob: blob.into(),
        created_ms: 1_000,
        is_latest: true,
    }
}

fn page(limit: usize) -> PageRequest {
    PageRequest { after: None, limit }
}

/// Collects every page of a listing.
async fn all_pages<T, F, Fut>(limit: usize, mut f: F) -> Vec<T>
where
    F: FnMut(PageRequest) -> Fut,
    Fut: std::future::Future<Output = StoreResult<Page<T>>>,
{
    let mut out = Vec::new();
    let mut req = page(limit);
    for _ in 0..1000 {
        let p = f(req.clone()).await.expect("page");
        assert!(p.items.len() <= limit);
        out.extend(p.items);
        match p.next {
            Some(n) => req.after = Some(n),
            None => return out,
        }
    }
    panic!("pagination did not terminate");
}

// ------------------------------------------------------------------ cases

async fn settings_are_created_once(s: Arc<dyn Store>) {
    assert_eq!(s.get_setting("k").await.expect("get"), None);
    assert_eq!(s.init_setting("k", "a").await.expect("init"), "a");
    assert_eq!(s.init_setting("k", "b").await.expect("init again"), "a");
    assert_eq!(s.get_setting("k").await.expect("get").as_deref(), Some("a"));
}

async fn things_crud_versions_and_listing(s: Arc<dyn Store>) {
    for i in 0..7 {
        s.create_thing(&thing(&format!("t{i}")))
            .await
            .expect("create");
    }
    assert!(matches!(
        s.create_thing(&thing("t0")).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let names: Vec<String> = all_pages(3, |p| {
        let s = s.clone();
        async move { s.list_things(&ThingFilter::default(), &p).await }
    })
    .await
    .into_iter()
    .map(|t| t.name)
    .collect();
    assert_eq!(names, (0..7).map(|i| format!("t{i}")).collect::<Vec<_>>());

    let mut t = s.get_thing("t1").await.expect("get").expect("exists");
    t.attributes.insert("hw".into(), "v2".into());
    assert!(matches!(
        s.update_thing(&t, Some(5)).await,
        Err(StoreError::VersionConflict(_))
    ));
    let updated = s.update_thing(&t, Some(1)).await.expect("update");
    assert_eq!(updated.version, 2);
    let filter = ThingFilter {
        attribute_name: Some("hw".into()),
        attribute_value: Some("v2".into()),
        ..ThingFilter::default()
    };
    let found = s.list_things(&filter, &page(10)).await.expect("filter");
    assert_eq!(
        found
            .items
            .iter()
            .map(|t| t.name.as_str())
            .collect::<Vec<_>>(),
        ["t1"]
    );
    let prefix = ThingFilter {
        attribute_name: Some("hw".into()),
        attribute_value: Some("v".into()),
        use_prefix_attribute_value: true,
        ..ThingFilter::default()
    };
    assert_eq!(
        s.list_things(&prefix, &page(100))
            .await
            .expect("prefix")
            .items
            .len(),
        7
    );

    assert!(matches!(
        s.delete_thing("t1", Some(1)).await,
        Err(StoreError::VersionConflict(_))
    ));
    s.delete_thing("t1", Some(2)).await.expect("delete");
    s.delete_thing("t1", None)
        .await
        .expect("deleting a missing thing succeeds");
    assert!(s.get_thing("t1").await.expect("get").is_none());
}

async fn concurrent_writers_use_optimistic_versions(s: Arc<dyn Store>) {
    s.create_thing(&thing("race")).await.expect("create");
    let mut tasks = Vec::new();
    for i in 0..8 {
        let s = s.clone();
        tasks.push(tokio::spawn(async move {
            let mut t = thing("race");
            t.attributes.insert("writer".into(), i.to_string());
            s.update_thing(&t, Some(1)).await
        }));
    }
    let mut ok = 0;
    for t in tasks {
        match t.await.expect("join") {
            Ok(_) => ok += 1,
            Err(StoreError::VersionConflict(_)) => {}
            Err(e) => panic!("unexpected error {e}"),
        }
    }
    assert_eq!(ok, 1, "exactly one writer wins");
    assert_eq!(
        s.get_thing("race")
            .await
            .expect("get")
            .expect("exists")
            .version,
        2
    );
}

async fn groups_hierarchy_and_membership(s: Arc<dyn Store>) {
    for t in ["a", "b", "c", "d"] {
        s.create_thing(&thing(t)).await.expect("thing");
    }
    s.create_thing_group(&group("root", None))
        .await
        .expect("root");
    s.create_thing_group(&group("child", Some("root")))
        .await
        .expect("child");
    s.create_thing_group(&group("grandchild", Some("child")))
        .await
        .expect("grandchild");
    assert!(matches!(
        s.create_thing_group(&group("orphan", Some("missing")))
            .await,
        Err(StoreError::NotFound(_))
    ));
    s.add_thing_to_group("root", "a").await.expect("add");
    s.add_thing_to_group("root", "a")
        .await
        .expect("add twice is a no-op");
    s.add_thing_to_group("child", "b").await.expect("add");
    s.add_thing_to_group("grandchild", "c").await.expect("add");
    s.add_thing_to_group("grandchild", "a").await.expect("add");
    assert!(matches!(
        s.add_thing_to_group("root", "zz").await,
        Err(StoreError::NotFound(_))
    ));

    let direct = s
        .list_things_in_group("root", false, &page(10))
        .await
        .expect("direct");
    assert_eq!(direct.items, ["a"]);
    let all: Vec<String> = all_pages(2, |p| {
        let s = s.clone();
        async move { s.list_things_in_group("root", true, &p).await }
    })
    .await;
    assert_eq!(all, ["a", "b", "c"]);

    let recursive = GroupFilter {
        parent_group: Some("root".into()),
        recursive: true,
        ..GroupFilter::default()
    };
    let names: Vec<String> = s
        .list_thing_groups(&recursive, &page(10))
        .await
        .expect("groups")
        .items
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(names, ["child", "grandchild"]);
    let for_a: Vec<String> = s
        .list_groups_for_thing("a", &page(10))
        .await
        .expect("for thing")
        .items
        .into_iter()
        .map(|g| g.name)
        .collect();
    assert_eq!(for_a, ["grandchild", "root"]);

    assert!(matches!(
        s.delete_thing_group("child", None).await,
        Err(StoreError::Invalid(_))
    ));
    s.delete_thing_group("grandchild", None)
        .await
        .expect("leaf delete");
    s.delete_thing_group("grandchild", None)
        .await
        .expect("missing group delete succeeds");
    s.remove_thing_from_group("root", "a")
        .await
        .expect("remove");
    assert!(
        s.list_things_in_group("root", true, &page(10))
            .await
            .expect("list")
            .items
            == ["b"]
    );
    s.delete_thing("b", None).await.expect("delete thing");
    assert!(
        s.list_things_in_group("child", false, &page(10))
            .await
            .expect("list")
            .items
            .is_empty()
    );
}

async fn streams_versions_and_order(s: Arc<dyn Store>) {
    for i in 0..5 {
        let st = Stream {
            id: format!("s{i}"),
            version: 1,
            description: None,
            files: vec![StreamFile {
                file_id: 0,
                bucket: "b".into(),
                key: "k".into(),
                version: None,
                resolved_version: "null".into(),
                size: 10,
                etag: None,
            }],
            role_arn: "arn:aws:iam::123456789012:role/r".into(),
            created_ms: 1_000 + i,
            updated_ms: 1_000 + i,
        };
        s.create_stream(&st).await.expect("create");
    }
    let mut st = s.get_stream("s2").await.expect("get").expect("exists");
    assert!(matches!(
        s.create_stream(&st).await,
        Err(StoreError::AlreadyExists(_))
    ));
    st.version = 2;
    st.description = Some("v2".into());
    s.update_stream(&st, 1).await.expect("update");
    assert!(matches!(
        s.update_stream(&st, 1).await,
        Err(StoreError::VersionConflict(_))
    ));
    assert_eq!(
        s.get_stream("s2")
            .await
            .expect("get")
            .expect("exists")
            .version,
        2
    );
    let desc: Vec<String> = all_pages(2, |p| {
        let s = s.clone();
        async move { s.list_streams(false, &p).await }
    })
    .await
    .into_iter()
    .map(|s| s.id)
    .collect();
    assert_eq!(desc, ["s4", "s3", "s2", "s1", "s0"]);
    s.delete_stream("s0").await.expect("delete");
    assert!(matches!(
        s.delete_stream("s0").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn jobs_executions_cancel_complete_delete(s: Arc<dyn Store>) {
    let targets = ["arn:aws:iot:us-east-1:123456789012:thinggroup/g"];
    let j = job("j1", TargetSelection::Snapshot, &targets);
    let execs: Vec<_> = ["d1", "d2", "d3"]
        .iter()
        .map(|t| execution("j1", t))
        .collect();
    s.create_job(&j, &execs).await.expect("create job");
    assert!(matches!(
        s.create_job(&j, &[]).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let counts = s.count_executions("j1").await.expect("counts");
    assert_eq!(counts.get(&ExecutionStatus::Queued), Some(&3));

    let listed = s
        .list_jobs(
            &JobFilter {
                target: Some(targets[0].into()),
                status: Some(JobStatus::InProgress),
                ..JobFilter::default()
            },
            &page(10),
        )
        .await
        .expect("list");
    assert_eq!(listed.items.len(), 1);
    assert!(
        s.list_jobs(
            &JobFilter {
                status: Some(JobStatus::Completed),
                ..JobFilter::default()
            },
            &page(10)
        )
        .await
        .expect("list")
        .items
        .is_empty()
    );

    // A stale version is refused.
    let mut e = s
        .get_execution("j1", "d1", None)
        .await
        .expect("get")
        .expect("exists");
    e.status = ExecutionStatus::InProgress;
    e.started_ms = Some(2_000);
    e.version = 3;
    assert!(matches!(
        s.update_execution(&e).await,
        Err(StoreError::VersionConflict(_))
    ));
    e.version = 2;
    s.update_execution(&e).await.expect("start");
    assert!(matches!(
        s.delete_job("j1", false).await,
        Err(StoreError::InvalidState(_))
    ));
    assert!(matches!(
        s.delete_execution("j1", "d1", 1, false).await,
        Err(StoreError::InvalidState(_))
    ));

    // Non-forced cancel leaves IN_PROGRESS executions alone; forced cancel takes them.
    let canceled = s
        .cancel_job(
            "j1",
            &CancelJob {
                force: false,
                reason_code: Some("R".into()),
                comment: None,
                now_ms: 3_000,
            },
        )
        .await
        .expect("cancel");
    assert_eq!(canceled.status, JobStatus::Canceled);
    let counts = s.count_executions("j1").await.expect("counts");
    assert_eq!(counts.get(&ExecutionStatus::Canceled), Some(&2));
    assert_eq!(counts.get(&ExecutionStatus::InProgress), Some(&1));
    let forced = s
        .cancel_job(
            "j1",
            &CancelJob {
                force: true,
                reason_code: None,
                comment: Some("c".into()),
                now_ms: 4_000,
            },
        )
        .await
        .expect("force cancel");
    assert!(forced.force_canceled);
    assert_eq!(forced.reason_code.as_deref(), Some("R"));
    let d1 = s
        .get_execution("j1", "d1", Some(1))
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(d1.status, ExecutionStatus::Canceled);
    assert!(d1.force_canceled);
    s.delete_job("j1", false)
        .await
        .expect("canceled jobs delete without force");
    assert!(s.get_job("j1").await.expect("get").is_none());
    assert!(
        s.get_execution("j1", "d1", None)
            .await
            .expect("get")
            .is_none()
    );
    s.create_job(&j, &[])
        .await
        .expect("a deleted job id can be reused");
}

async fn snapshot_jobs_complete_when_all_executions_end(s: Arc<dyn Store>) {
    let j = job("j2", TargetSelection::Snapshot, &[]);
    s.create_job(&j, &[execution("j2", "x"), execution("j2", "y")])
        .await
        .expect("create");
    for (thing, status) in [
        ("x", ExecutionStatus::Succeeded),
        ("y", ExecutionStatus::Failed),
    ] {
        let mut e = s
            .get_execution("j2", thing, None)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(
            s.get_job("j2").await.expect("get").expect("exists").status,
            JobStatus::InProgress
        );
        e.status = status;
        e.version += 1;
        e.updated_ms = 5_000;
        s.update_execution(&e).await.expect("update");
    }
    let done = s.get_job("j2").await.expect("get").expect("exists");
    assert_eq!(done.status, JobStatus::Completed);
    assert_eq!(done.completed_ms, Some(5_000));

    // CONTINUOUS jobs never complete on their own.
    let c = job("j3", TargetSelection::Continuous, &[]);
    s.create_job(&c, &[execution("j3", "x")])
        .await
        .expect("create");
    let mut e = s
        .get_execution("j3", "x", None)
        .await
        .expect("get")
        .expect("exists");
    e.status = ExecutionStatus::Succeeded;
    e.version += 1;
    s.update_execution(&e).await.expect("update");
    assert_eq!(
        s.get_job("j3").await.expect("get").expect("exists").status,
        JobStatus::InProgress
    );

    // Deleting the last pending execution completes a SNAPSHOT job too.
    s.create_job(
        &job("j4", TargetSelection::Snapshot, &[]),
        &[execution("j4", "x")],
    )
    .await
    .expect("create");
    s.delete_execution("j4", "x", 1, true)
        .await
        .expect("forced delete");
    assert_eq!(
        s.get_job("j4").await.expect("get").expect("exists").status,
        JobStatus::Completed
    );

    let for_thing: Vec<String> = all_pages(1, |p| {
        let s = s.clone();
        async move { s.list_executions_for_thing("x", None, None, &p).await }
    })
    .await
    .into_iter()
    .map(|e| e.job_id)
    .collect();
    assert_eq!(for_thing, ["j2", "j3"]);
    let succeeded = s
        .list_executions_for_job("j2", Some(ExecutionStatus::Succeeded), &page(10))
        .await
        .expect("list");
    assert_eq!(succeeded.items.len(), 1);
}

async fn ota_update_records(s: Arc<dyn Store>) {
    let mut o = OtaUpdate {
        id: "o1".into(),
        status: OtaUpdateStatus::CreatePending,
        request: serde_json::json!({"files": [{"fileName": "f"}]}),
        job_id: Some("AFR_OTA-o1".into()),
        stream_id: None,
        error_code: None,
        error_message: None,
        created_ms: 1,
        updated_ms: 1,
    };
    s.create_ota_update(&o).await.expect("create");
    assert!(matches!(
        s.create_ota_update(&o).await,
        Err(StoreError::AlreadyExists(_))
    ));
    o.status = OtaUpdateStatus::CreateComplete;
    s.update_ota_update(&o).await.expect("update");
    let complete = s
        .list_ota_updates(Some(OtaUpdateStatus::CreateComplete), &page(10))
        .await
        .expect("list");
    assert_eq!(complete.items, vec![o.clone()]);
    assert!(
        s.list_ota_updates(Some(OtaUpdateStatus::CreatePending), &page(10))
            .await
            .expect("list")
            .items
            .is_empty()
    );
    s.delete_ota_update("o1").await.expect("delete");
    assert!(matches!(
        s.delete_ota_update("o1").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn objects_follow_bucket_versioning(s: Arc<dyn Store>) {
    let b = Bucket {
        name: "fw".into(),
        versioning: Versioning::Unversioned,
        created_ms: 1,
    };
    s.create_bucket(&b).await.expect("bucket");
    assert!(matches!(
        s.create_bucket(&b).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert!(matches!(
        s.put_object(&object("nope", "k", "v", "blob0")).await,
        Err(StoreError::NotFound(_))
    ));
    // Unversioned: a write replaces the one version and orphans its blob.
    assert!(
        s.put_object(&object("fw", "k", "v1", "blob1"))
            .await
            .expect("put")
            .is_empty()
    );
    assert_eq!(
        s.put_object(&object("fw", "k", "v2", "blob2"))
            .await
            .expect("put"),
        ["blob1"]
    );
    let cur = s
        .get_object("fw", "k", None)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(
        (cur.version_id.as_str(), cur.blob.as_str()),
        ("null", "blob2")
    );
    assert_eq!(
        cur.checksum.as_ref().map(|c| c.algorithm.as_str()),
        Some("crc32")
    );

    // Enabled: every write is kept; delete adds a marker; deleting the marker restores.
    s.set_bucket_versioning("fw", Versioning::Enabled)
        .await
        .expect("enable");
    assert!(
        s.put_object(&object("fw", "k", "v3", "blob3"))
            .await
            .expect("put")
            .is_empty()
    );
    assert_eq!(
        s.get_object("fw", "k", None)
            .await
            .expect("get")
            .expect("exists")
            .version_id,
        "v3"
    );
    let del = s.delete_object("fw", "k", None, 9).await.expect("delete");
    assert!(del.delete_marker && del.orphaned_blobs.is_empty());
    let latest = s
        .get_object("fw", "k", None)
        .await
        .expect("get")
        .expect("marker");
    assert!(latest.delete_marker);
    assert_eq!(
        s.get_object("fw", "k", Some("v3"))
            .await
            .expect("get")
            .expect("kept")
            .blob,
        "blob3"
    );
    let marker = del.version_id.expect("marker version");
    s.delete_object("fw", "k", Some(&marker), 10)
        .await
        .expect("delete marker");
    assert_eq!(
        s.get_object("fw", "k", None)
            .await
            .expect("get")
            .expect("restored")
            .version_id,
        "v3"
    );
    let gone = s
        .delete_object("fw", "k", Some("v3"), 11)
        .await
        .expect("delete version");
    assert_eq!(gone.orphaned_blobs, ["blob3"]);
    assert_eq!(
        s.get_object("fw", "k", None)
            .await
            .expect("get")
            .expect("older")
            .version_id,
        "null"
    );
    assert_eq!(
        s.list_object_versions("fw", "", 100)
            .await
            .expect("versions")
            .len(),
        1
    );

    // Suspended versioning is unversioned from the writer's point of view; it can't go back.
    s.set_bucket_versioning("fw", Versioning::Suspended)
        .await
        .expect("suspend");
    s.set_bucket_versioning("fw", Versioning::Unversioned)
        .await
        .expect("stays suspended");
    assert_eq!(
        s.get_bucket("fw")
            .await
            .expect("get")
            .expect("exists")
            .versioning,
        Versioning::Suspended
    );
    assert!(matches!(
        s.delete_bucket("fw").await,
        Err(StoreError::Conflict(_))
    ));
}

async fn object_listing_with_delimiters_and_pages(s: Arc<dyn Store>) {
    s.create_bucket(&Bucket {
        name: "l".into(),
        versioning: Versioning::Unversioned,
        created_ms: 1,
    })
    .await
    .expect("bucket");
    for k in ["a.bin", "dir/1", "dir/2", "dir/sub/3", "e.bin", "z/9"] {
        s.put_object(&object("l", k, "v", &format!("blob-{k}")))
            .await
            .expect("put");
    }
    s.delete_object("l", "e.bin", None, 5)
        .await
        .expect("delete");
    let all = s
        .list_objects("l", "", None, None, 1000)
        .await
        .expect("list");
    let keys: Vec<_> = all.objects.iter().map(|o| o.key.as_str()).collect();
    assert_eq!(keys, ["a.bin", "dir/1", "dir/2", "dir/sub/3", "z/9"]);
    let top = s
        .list_objects("l", "", Some("/"), None, 1000)
        .await
        .expect("list");
    assert_eq!(
        top.objects
            .iter()
            .map(|o| o.key.as_str())
            .collect::<Vec<_>>(),
        ["a.bin"]
    );
    assert_eq!(top.common_prefixes, ["dir/", "z/"]);
    let dir = s
        .list_objects("l", "dir/", Some("/"), None, 1000)
        .await
        .expect("list");
    assert_eq!(dir.objects.len(), 2);
    assert_eq!(dir.common_prefixes, ["dir/sub/"]);
    let first = s
        .list_objects("l", "", None, None, 2)
        .await
        .expect("page 1");
    assert_eq!(first.objects.len(), 2);
    let after = first.next_after.expect("more");
    let second = s
        .list_objects("l", "", None, Some(&after), 2)
        .await
        .expect("page 2");
    assert_eq!(second.objects[0].key, "dir/2");

    let up = MultipartUpload {
        upload_id: "u1".into(),
        bucket: "l".into(),
        key: "big".into(),
        content_type: None,
        checksum_algorithm: Some("CRC32".into()),
        metadata: BTreeMap::new(),
        created_ms: 1,
    };
    s.create_upload(&up).await.expect("upload");
    let part = |n: i64, blob: &str| UploadPart {
        upload_id: "u1".into(),
        part_number: n,
        size: 5,
        etag: "\"p\"".into(),
        checksum: None,
        blob: blob.into(),
        created_ms: 1,
    };
    assert_eq!(s.put_part(&part(2, "p2")).await.expect("part"), None);
    assert_eq!(s.put_part(&part(1, "p1")).await.expect("part"), None);
    assert_eq!(
        s.put_part(&part(1, "p1b")).await.expect("replace"),
        Some("p1".into())
    );
    let parts = s.list_parts("u1").await.expect("parts");
    assert_eq!(
        parts.iter().map(|p| p.blob.as_str()).collect::<Vec<_>>(),
        ["p1b", "p2"]
    );
    assert_eq!(s.list_uploads("l").await.expect("uploads").len(), 1);
    let mut blobs = s.delete_upload("u1").await.expect("abort");
    blobs.sort();
    assert_eq!(blobs, ["p1b", "p2"]);
    assert!(matches!(
        s.put_part(&part(3, "p3")).await,
        Err(StoreError::NotFound(_))
    ));
}

// ------------------------------------------------------------------ signing

fn acm_certificate(id: &str, created_ms: i64) -> AcmCertificate {
    AcmCertificate {
        id: id.into(),
        arn: format!("arn:aws:acm:us-east-1:123456789012:certificate/{id}"),
        certificate_pem: "-----BEGIN CERTIFICATE-----\nMA==\n-----END CERTIFICATE-----\n".into(),
        chain_pem: None,
        sealed_private_key: "v1:abcd:c2VhbGVk".into(),
        key_algorithm: "EC_prime256v1".into(),
        domain_name: Some("signer.example.com".into()),
        subject: "CN=signer.example.com".into(),
        issuer: "CN=signer.example.com".into(),
        serial: "01:02".into(),
        not_before_ms: 1_000,
        not_after_ms: 9_000_000,
        tags: BTreeMap::from([("team".to_owned(), "fw".to_owned())]),
        created_ms,
        imported_ms: created_ms,
    }
}

fn signing_profile(name: &str, cert_arn: &str, platform: &str) -> SigningProfile {
    SigningProfile {
        name: name.into(),
        version: "Ab3dE6gH9j".into(),
        platform_id: platform.into(),
        certificate_arn: cert_arn.into(),
        signing_parameters: BTreeMap::from([("certname".to_owned(), "/certs/s.pem".to_owned())]),
        validity_value: 135,
        validity_type: "MONTHS".into(),
        overrides: None,
        status: ProfileStatus::Active,
        tags: BTreeMap::new(),
        created_ms: 1_000,
        updated_ms: 1_000,
    }
}

fn signing_job(id: &str, token: &str, created_ms: i64) -> SigningJob {
    SigningJob {
        id: id.into(),
        client_request_token: token.into(),
        profile_name: "p1".into(),
        profile_version: "Ab3dE6gH9j".into(),
        platform_id: "AmazonFreeRTOS-Default".into(),
        certificate_arn: "arn:aws:acm:us-east-1:123456789012:certificate/c1".into(),
        signing_parameters: BTreeMap::from([("certname".to_owned(), "/certs/s.pem".to_owned())]),
        overrides: Some(serde_json::json!({"signingImageFormat": "JSONEmbedded"})),
        validity_value: 135,
        validity_type: "MONTHS".into(),
        source_bucket: "fw".into(),
        source_key: "fw.bin".into(),
        source_version: "v1".into(),
        destination_bucket: "fw".into(),
        destination_prefix: "signed/".into(),
        signed_key: None,
        signed_version: None,
        signature: None,
        payload_size: None,
        payload_sha256: None,
        status: SigningJobStatus::InProgress,
        status_reason: None,
        requested_by: "arn:aws:iam::123456789012:root".into(),
        created_ms,
        completed_ms: None,
        signature_expires_ms: None,
    }
}

async fn acm_certificates_and_profile_references(s: Arc<dyn Store>) {
    for (i, id) in ["c3", "c1", "c2"].iter().enumerate() {
        let created = 1_000 + i64::try_from(i).expect("small");
        s.create_acm_certificate(&acm_certificate(id, created))
            .await
            .expect("create");
    }
    assert!(matches!(
        s.create_acm_certificate(&acm_certificate("c1", 5)).await,
        Err(StoreError::AlreadyExists(_))
    ));
    let got = s
        .get_acm_certificate("c1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got, acm_certificate("c1", 1_001));
    assert!(s.get_acm_certificate("nope").await.expect("get").is_none());

    // Import order, both directions, across pages.
    let asc: Vec<String> = all_pages(2, |p| {
        let s = s.clone();
        async move { s.list_acm_certificates(false, &p).await }
    })
    .await
    .into_iter()
    .map(|c| c.id)
    .collect();
    assert_eq!(asc, ["c3", "c1", "c2"]);
    let desc: Vec<String> = all_pages(1, |p| {
        let s = s.clone();
        async move { s.list_acm_certificates(true, &p).await }
    })
    .await
    .into_iter()
    .map(|c| c.id)
    .collect();
    assert_eq!(desc, ["c2", "c1", "c3"]);

    // Re-import replaces the material and keeps identity, tags and creation time.
    let mut re = acm_certificate("c1", 77);
    re.subject = "CN=renewed".into();
    re.sealed_private_key = "v1:abcd:bmV3".into();
    re.tags.clear();
    re.imported_ms = 5_000;
    s.reimport_acm_certificate(&re).await.expect("reimport");
    let got = s
        .get_acm_certificate("c1")
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(got.subject, "CN=renewed");
    assert_eq!(got.sealed_private_key, "v1:abcd:bmV3");
    assert_eq!(got.created_ms, 1_001);
    assert_eq!(got.imported_ms, 5_000);
    assert_eq!(got.tags.get("team").map(String::as_str), Some("fw"));
    assert!(matches!(
        s.reimport_acm_certificate(&acm_certificate("missing", 1))
            .await,
        Err(StoreError::NotFound(_))
    ));

    // A profile needs its certificate; an Active profile keeps it from deletion.
    let arn = got.arn.clone();
    assert!(matches!(
        s.create_signing_profile(&signing_profile(
            "p0",
            "arn:aws:acm:us-east-1:123456789012:certificate/none",
            "AmazonFreeRTOS-Default"
        ))
        .await,
        Err(StoreError::NotFound(_))
    ));
    let p1 = signing_profile("p1", &arn, "AmazonFreeRTOS-Default");
    s.create_signing_profile(&p1).await.expect("profile");
    assert_eq!(
        s.get_signing_profile("p1").await.expect("get"),
        Some(p1.clone())
    );
    assert!(matches!(
        s.create_signing_profile(&p1).await,
        Err(StoreError::AlreadyExists(_))
    ));
    assert_eq!(
        s.profiles_using_certificate(&arn)
            .await
            .expect("users")
            .iter()
            .map(|p| p.name.as_str())
            .collect::<Vec<_>>(),
        ["p1"]
    );
    assert!(matches!(
        s.delete_acm_certificate("c1").await,
        Err(StoreError::Conflict(_))
    ));
    let canceled = s
        .set_signing_profile_status("p1", ProfileStatus::Canceled, 2_000)
        .await
        .expect("cancel");
    assert_eq!(canceled.status, ProfileStatus::Canceled);
    assert_eq!(canceled.updated_ms, 2_000);
    assert!(matches!(
        s.set_signing_profile_status("p1", ProfileStatus::Canceled, 3_000)
            .await,
        Err(StoreError::InvalidState(_))
    ));
    assert!(matches!(
        s.set_signing_profile_status("nope", ProfileStatus::Canceled, 3_000)
            .await,
        Err(StoreError::NotFound(_))
    ));
    // A canceled profile's name stays taken.
    assert!(matches!(
        s.create_signing_profile(&p1).await,
        Err(StoreError::AlreadyExists(_))
    ));
    s.delete_acm_certificate("c1").await.expect("delete");
    assert!(s.get_acm_certificate("c1").await.expect("get").is_none());
    assert!(matches!(
        s.delete_acm_certificate("c1").await,
        Err(StoreError::NotFound(_))
    ));
}

async fn signing_profiles_filters_and_pages(s: Arc<dyn Store>) {
    let cert = acm_certificate("c1", 1_000);
    s.create_acm_certificate(&cert).await.expect("cert");
    for i in 0..7 {
        let platform = if i % 2 == 0 {
            "AmazonFreeRTOS-Default"
        } else {
            "AmazonFreeRTOS-TI-CC3220SF"
        };
        s.create_signing_profile(&signing_profile(&format!("p{i}"), &cert.arn, platform))
            .await
            .expect("profile");
    }
    for name in ["p1", "p4"] {
        s.set_signing_profile_status(name, ProfileStatus::Canceled, 2_000)
            .await
            .expect("cancel");
    }
    s.set_signing_profile_status("p5", ProfileStatus::Revoked, 2_000)
        .await
        .expect("revoke");
    let names = |statuses: Vec<ProfileStatus>, platform: Option<&str>| {
        let s = s.clone();
        let filter = ProfileFilter {
            statuses,
            platform_id: platform.map(str::to_owned),
        };
        async move {
            all_pages(2, |p| {
                let s = s.clone();
                let filter = filter.clone();
                async move { s.list_signing_profiles(&filter, &p).await }
            })
            .await
            .into_iter()
            .map(|p| p.name)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        names(vec![ProfileStatus::Active], None).await,
        ["p0", "p2", "p3", "p6"]
    );
    assert_eq!(
        names(vec![ProfileStatus::Active, ProfileStatus::Canceled], None).await,
        ["p0", "p1", "p2", "p3", "p4", "p6"]
    );
    assert_eq!(names(ProfileStatus::ALL.to_vec(), None).await.len(), 7);
    assert_eq!(names(vec![ProfileStatus::Revoked], None).await, ["p5"]);
    assert_eq!(
        names(
            ProfileStatus::ALL.to_vec(),
            Some("AmazonFreeRTOS-TI-CC3220SF")
        )
        .await,
        ["p1", "p3", "p5"]
    );
    assert!(names(Vec::new(), None).await.is_empty());
}

async fn signing_jobs_idempotent_complete_and_list(s: Arc<dyn Store>) {
    let first = signing_job("j1", "token-1", 1_000);
    assert_eq!(s.create_signing_job(&first).await.expect("create"), first);
    // The same token answers with the first job, whatever else differs.
    let again = signing_job("j1-other", "token-1", 9_000);
    assert_eq!(s.create_signing_job(&again).await.expect("again"), first);
    assert!(s.get_signing_job("j1-other").await.expect("get").is_none());
    assert_eq!(
        s.get_signing_job_by_token("token-1")
            .await
            .expect("by token"),
        Some(first.clone())
    );

    let mut done = first.clone();
    done.status = SigningJobStatus::Succeeded;
    done.status_reason = Some("Signing Succeeded".into());
    done.signed_key = Some("signed/j1".into());
    done.signed_version = Some("v9".into());
    done.signature = Some("MEUCIQ==".into());
    done.payload_size = Some(70_001);
    done.payload_sha256 = Some("ab".repeat(32));
    done.completed_ms = Some(1_500);
    done.signature_expires_ms = Some(50_000);
    s.complete_signing_job(&done).await.expect("complete");
    assert_eq!(
        s.get_signing_job("j1").await.expect("get"),
        Some(done.clone())
    );
    let mut twice = done.clone();
    twice.status = SigningJobStatus::Failed;
    assert!(matches!(
        s.complete_signing_job(&twice).await,
        Err(StoreError::InvalidState(_))
    ));
    assert!(matches!(
        s.complete_signing_job(&signing_job("nope", "t", 1)).await,
        Err(StoreError::NotFound(_))
    ));

    // More jobs: j2..j6, one per millisecond, and two in the same millisecond.
    for i in 2..=6 {
        let mut j = signing_job(&format!("j{i}"), &format!("token-{i}"), 1_000 + i);
        if i == 4 {
            j.platform_id = "AmazonFreeRTOS-TI-CC3220SF".into();
        }
        s.create_signing_job(&j).await.expect("job");
    }
    s.create_signing_job(&signing_job("j7a", "token-7a", 2_000))
        .await
        .expect("job");
    s.create_signing_job(&signing_job("j7b", "token-7b", 2_000))
        .await
        .expect("job");
    let list = |filter: SigningJobFilter| {
        let s = s.clone();
        async move {
            all_pages(2, |p| {
                let s = s.clone();
                let filter = filter.clone();
                async move { s.list_signing_jobs(&filter, &p).await }
            })
            .await
            .into_iter()
            .map(|j| j.id)
            .collect::<Vec<_>>()
        }
    };
    assert_eq!(
        list(SigningJobFilter::default()).await,
        ["j7b", "j7a", "j6", "j5", "j4", "j3", "j2", "j1"]
    );
    assert_eq!(
        list(SigningJobFilter {
            status: Some(SigningJobStatus::Succeeded),
            ..SigningJobFilter::default()
        })
        .await,
        ["j1"]
    );
    assert_eq!(
        list(SigningJobFilter {
            platform_id: Some("AmazonFreeRTOS-TI-CC3220SF".into()),
            ..SigningJobFilter::default()
        })
        .await,
        ["j4"]
    );
    assert_eq!(
        list(SigningJobFilter {
            signature_expires_before: Some(60_000),
            ..SigningJobFilter::default()
        })
        .await,
        ["j1"]
    );
    assert!(
        list(SigningJobFilter {
            signature_expires_after: Some(60_000),
            ..SigningJobFilter::default()
        })
        .await
        .is_empty()
    );
    assert!(
        list(SigningJobFilter {
            requested_by: Some("someone-else".into()),
            ..SigningJobFilter::default()
        })
        .await
        .is_empty()
    );
}

// ------------------------------------------------------------------ harness

/// The stored execution of `job` on `thing` as a device's next update to `status` at
/// `at_ms` writes it.
async fn moved_on(
    s: &dyn Store,
    job: &str,
    thing: &str,
    status: ExecutionStatus,
    at_ms: i64,
) -> JobExecution {
    let mut e = s
        .get_execution(job, thing, None)
        .await
        .expect("get")
        .expect("exists");
    e.status = status;
    e.version += 1;
    e.updated_ms = at_ms;
    e
}

/// A device's update, asking for as much of the pending list as a `notify` carries.
fn update(execution: JobExecution) -> DeviceWrite {
    DeviceWrite::Update {
        execution,
        pending: ENDED_PENDING_LIMIT,
    }
}

async fn ended_updates_carry_the_pending_list_they_ask_for(s: Arc<dyn Store>) {
    // Three things, each with jobs l1 (to end), l2 and l3 pending; each asks for another
    // length of the list its update leaves.
    let things = ["l-none", "l-head", "l-all"];
    for (n, id) in ["l1", "l2", "l3"].into_iter().enumerate() {
        let executions: Vec<JobExecution> = things
            .iter()
            .map(|t| {
                let mut e = execution(id, t);
                e.queued_ms = 1_000 * (n as i64 + 1);
                e
            })
            .collect();
        s.create_job(&job(id, TargetSelection::Snapshot, &[]), &executions)
            .await
            .expect("create");
    }
    let mut writes = Vec::new();
    for (thing, pending) in things.iter().zip([0, 1, ENDED_PENDING_LIMIT]) {
        writes.push(DeviceWrite::Update {
            execution: moved_on(s.as_ref(), "l1", thing, ExecutionStatus::Rejected, 5_000).await,
            pending,
        });
    }
    let out = s.device_writes(&writes).await.expect("batch");
    let listed = |o: &DeviceWriteOutcome| match o {
        DeviceWriteOutcome::Ended(list) => list.iter().map(|e| e.job_id.clone()).collect(),
        other => panic!("{other:?}"),
    };
    let lists: Vec<Vec<String>> = out.iter().map(listed).collect();
    assert_eq!(
        lists,
        [
            vec![],
            vec!["l2".to_owned()],
            vec!["l2".to_owned(), "l3".to_owned()]
        ]
    );
    // The last of the job's executions ended: it completed even though no update asked
    // for a list.
    let l1 = s.get_job("l1").await.expect("get").expect("exists");
    assert_eq!(l1.status, JobStatus::Completed);
}

async fn device_writes_batch_start_next_and_updates(s: Arc<dyn Store>) {
    // Two jobs queued for d, one for e; queue times order d's list.
    let mut first = execution("b1", "d");
    first.queued_ms = 1_000;
    let mut second = execution("b2", "d");
    second.queued_ms = 2_000;
    s.create_job(
        &job("b1", TargetSelection::Snapshot, &[]),
        &[first, execution("b1", "e")],
    )
    .await
    .expect("create b1");
    s.create_job(&job("b2", TargetSelection::Snapshot, &[]), &[second])
        .await
        .expect("create b2");

    let start = |thing: &str| DeviceWrite::StartNext {
        thing: thing.into(),
        status_details: Some(BTreeMap::from([("step".to_owned(), "1".to_owned())])),
        now_ms: 3_000,
    };
    // One batch: start d and e, start d again (the same execution, unchanged), start a
    // thing with nothing pending.
    let out = s
        .device_writes(&[start("d"), start("e"), start("d"), start("nobody")])
        .await
        .expect("batch");
    let started = |o: &DeviceWriteOutcome| match o {
        DeviceWriteOutcome::Started(e) => e.clone(),
        other => panic!("not a start: {other:?}"),
    };
    let d = started(&out[0]).expect("d started");
    assert_eq!(
        (d.job_id.as_str(), d.status, d.version),
        ("b1", ExecutionStatus::InProgress, 2)
    );
    assert_eq!(d.started_ms, Some(3_000));
    assert_eq!(d.status_details.get("step").map(String::as_str), Some("1"));
    assert_eq!(started(&out[1]).expect("e started").job_id, "b1");
    assert_eq!(
        started(&out[2]),
        Some(d.clone()),
        "an IN_PROGRESS head is returned as is"
    );
    assert_eq!(started(&out[3]), None);
    assert_eq!(
        s.get_execution("b1", "d", None).await.expect("get"),
        Some(d.clone()),
        "the store holds what start-next answered"
    );

    // Updates in one batch: d succeeds; a stale write loses; e fails, which ends b1.
    let mut done = d.clone();
    done.status = ExecutionStatus::Succeeded;
    done.version = 3;
    done.updated_ms = 4_000;
    let mut stale = d.clone();
    stale.status = ExecutionStatus::Failed;
    stale.version = 3;
    let e = moved_on(s.as_ref(), "b1", "e", ExecutionStatus::Failed, 4_500).await;
    // A write read from another incarnation of the execution (a re-created job: same
    // version, other queue time) is refused too.
    let mut other_life = e.clone();
    other_life.queued_ms = 999;
    let out = s
        .device_writes(&[
            update(done.clone()),
            update(stale),
            update(other_life),
            update(e),
            start("d"),
        ])
        .await
        .expect("batch");
    let b2_started = started(&out[4]).expect("b2 started");
    assert_eq!(
        b2_started.job_id, "b2",
        "later writes in a batch see earlier ones"
    );
    // Ending an execution answers with the thing's pending list as the batch left it.
    assert_eq!(
        out[..4],
        [
            DeviceWriteOutcome::Ended(vec![b2_started.clone()]),
            DeviceWriteOutcome::Updated(false),
            DeviceWriteOutcome::Updated(false),
            DeviceWriteOutcome::Ended(vec![]),
        ]
    );
    assert_eq!(
        s.get_execution("b1", "d", None).await.expect("get"),
        Some(done)
    );
    let b1 = s.get_job("b1").await.expect("get").expect("exists");
    assert_eq!(
        (b1.status, b1.completed_ms),
        (JobStatus::Completed, Some(4_500))
    );
}

async fn concurrent_last_executions_complete_the_job(s: Arc<dyn Store>) {
    // Two transactions end the last two executions at once: one of them must complete the
    // job (on PostgreSQL each could otherwise see the other's as still pending).
    for round in 0..20 {
        let id = format!("race{round}");
        s.create_job(
            &job(&id, TargetSelection::Snapshot, &[]),
            &[execution(&id, "x"), execution(&id, "y")],
        )
        .await
        .expect("create");
        let mut tasks = Vec::new();
        for thing in ["x", "y"] {
            let s = s.clone();
            let id = id.clone();
            tasks.push(tokio::spawn(async move {
                let e = moved_on(s.as_ref(), &id, thing, ExecutionStatus::Succeeded, 9_000).await;
                s.device_writes(&[update(e)]).await
            }));
        }
        for t in tasks {
            assert_eq!(
                t.await.expect("task").expect("write"),
                [DeviceWriteOutcome::Ended(vec![])]
            );
        }
        let j = s.get_job(&id).await.expect("get").expect("exists");
        assert_eq!(j.status, JobStatus::Completed, "round {round}");
    }
}

async fn device_writes_many_things_in_one_batch(s: Arc<dyn Store>) {
    // More things than one multi-row statement carries; every third update is stale.
    let things: Vec<String> = (0..150).map(|i| format!("m{i:03}")).collect();
    let executions: Vec<JobExecution> = things.iter().map(|t| execution("many", t)).collect();
    s.create_job(&job("many", TargetSelection::Snapshot, &[]), &executions)
        .await
        .expect("create");
    let writes: Vec<DeviceWrite> = executions
        .iter()
        .enumerate()
        .map(|(i, e)| {
            let mut e = e.clone();
            e.status = if i % 2 == 0 {
                ExecutionStatus::InProgress
            } else {
                ExecutionStatus::Succeeded
            };
            e.started_ms = (i % 4 == 0).then_some(2_000 + i as i64);
            e.status_details = BTreeMap::from([("i".to_owned(), i.to_string())]);
            e.updated_ms = 3_000;
            e.version = if i % 3 == 0 { 5 } else { 2 };
            update(e)
        })
        .collect();
    let out = s.device_writes(&writes).await.expect("batch");
    assert_eq!(out.len(), writes.len());
    let stored = async |i: usize| {
        s.get_execution("many", &things[i], None)
            .await
            .expect("get")
            .expect("exists")
    };
    for (i, (w, o)) in writes.iter().zip(&out).enumerate() {
        let DeviceWrite::Update {
            execution: want, ..
        } = w
        else {
            unreachable!()
        };
        let stored = stored(i).await;
        if i % 3 == 0 {
            assert_eq!(o, &DeviceWriteOutcome::Updated(false), "{i}");
            assert_eq!(
                (stored.version, stored.status),
                (1, ExecutionStatus::Queued)
            );
        } else {
            let outcome = if want.status.is_terminal() {
                DeviceWriteOutcome::Ended(vec![])
            } else {
                DeviceWriteOutcome::Updated(true)
            };
            assert_eq!(o, &outcome, "{i}");
            assert_eq!(&stored, want, "{i}");
        }
    }
    let j = s.get_job("many").await.expect("get").expect("exists");
    assert_eq!(
        j.status,
        JobStatus::InProgress,
        "stale ones are still queued"
    );

    // StartNext for every thing in one batch: the still queued ones start, the ones in
    // progress come back as they are, the ended ones have nothing pending.
    let starts: Vec<DeviceWrite> = things
        .iter()
        .map(|t| DeviceWrite::StartNext {
            thing: t.clone(),
            status_details: None,
            now_ms: 5_000,
        })
        .collect();
    let out = s.device_writes(&starts).await.expect("start batch");
    for (i, o) in out.iter().enumerate() {
        let DeviceWriteOutcome::Started(started) = o else {
            panic!("{i}: {o:?}");
        };
        let stored = stored(i).await;
        if i % 3 == 0 {
            let e = started.as_ref().expect("queued one started");
            assert_eq!(
                (e.status, e.version, e.started_ms),
                (ExecutionStatus::InProgress, 2, Some(5_000)),
                "{i}"
            );
            assert_eq!(&stored, e, "{i}");
        } else if i % 2 == 0 {
            assert_eq!(
                started.as_ref(),
                Some(&stored),
                "{i}: in progress as it was"
            );
            assert_eq!(stored.version, 2, "{i}");
        } else {
            assert_eq!(started, &None, "{i}: nothing pending");
        }
    }

    // The ones in progress (still as the first batch wrote them: StartNext left them
    // alone) report progress (same status, new details) next to updates
    // that change it; a stale one of each kind is refused.
    let mut progress = Vec::new();
    for (i, w) in writes.iter().enumerate() {
        let DeviceWrite::Update { execution: e, .. } = w else {
            unreachable!()
        };
        if i % 3 == 0 || i % 2 == 1 {
            continue;
        }
        let mut e = e.clone();
        if i % 4 == 0 {
            e.status = ExecutionStatus::Succeeded;
        }
        e.status_details = BTreeMap::from([("step".to_owned(), format!("{i}+"))]);
        e.updated_ms = 4_000;
        e.version = if i % 5 == 0 { 2 } else { 3 };
        progress.push((i, e));
    }
    let out = s
        .device_writes(
            &progress
                .iter()
                .map(|(_, e)| update(e.clone()))
                .collect::<Vec<_>>(),
        )
        .await
        .expect("progress batch");
    for ((i, e), o) in progress.iter().zip(&out) {
        let stored = stored(*i).await;
        if i % 5 == 0 {
            assert_eq!(o, &DeviceWriteOutcome::Updated(false), "{i}");
            assert_eq!(stored.version, 2, "{i}");
        } else {
            assert!(
                matches!(
                    o,
                    DeviceWriteOutcome::Updated(true) | DeviceWriteOutcome::Ended(_)
                ),
                "{i}: {o:?}"
            );
            assert_eq!(&stored, e, "{i}");
        }
    }
}

async fn concurrent_callers_get_their_own_outcomes(s: Arc<dyn Store>) {
    // Many callers at once, each with two writes (start its thing's job, then end it):
    // however the store groups them, each caller gets its own outcomes, in order, and the
    // second write sees the first.
    let things: Vec<String> = (0..60).map(|i| format!("c{i:02}")).collect();
    let executions: Vec<JobExecution> = things.iter().map(|t| execution("each", t)).collect();
    s.create_job(&job("each", TargetSelection::Snapshot, &[]), &executions)
        .await
        .expect("create");
    let calls = things.iter().map(|t| {
        let s = s.clone();
        let mut done = JobExecution::queued("each", t, 1_000);
        done.status = ExecutionStatus::Succeeded;
        done.started_ms = Some(2_000);
        done.updated_ms = 3_000;
        done.version = 3;
        done.status_details = BTreeMap::from([("by".to_owned(), t.clone())]);
        let writes = vec![
            DeviceWrite::StartNext {
                thing: t.clone(),
                status_details: None,
                now_ms: 2_000,
            },
            update(done),
        ];
        async move { (writes.clone(), s.device_writes(&writes).await) }
    });
    for (writes, out) in futures::future::join_all(calls).await {
        let DeviceWrite::StartNext { thing, .. } = &writes[0] else {
            unreachable!()
        };
        let out = out.expect("writes");
        assert_eq!(out.len(), 2, "{thing}");
        let DeviceWriteOutcome::Started(Some(started)) = &out[0] else {
            panic!("{thing}: {:?}", out[0]);
        };
        assert_eq!(
            (started.thing_name.as_str(), started.version),
            (thing.as_str(), 2)
        );
        assert_eq!(out[1], DeviceWriteOutcome::Ended(vec![]), "{thing}");
        let stored = s
            .get_execution("each", thing, None)
            .await
            .expect("get")
            .expect("exists");
        assert_eq!(stored.status_details["by"], *thing);
    }
    let j = s.get_job("each").await.expect("get").expect("exists");
    assert_eq!(j.status, JobStatus::Completed);
}

macro_rules! conformance {
    ($($case:ident),+ $(,)?) => {
        mod sqlite {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some((store, _guard)) = super::sqlite_store().await else { return };
                    super::$case(std::sync::Arc::new(store)).await;
                }
            )+
        }
        mod postgres {
            $(
                #[tokio::test]
                async fn $case() {
                    let Some((store, _guard)) = super::postgres_store().await else { return };
                    super::$case(std::sync::Arc::new(store)).await;
                }
            )+
        }
    };
}

conformance!(
    settings_are_created_once,
    things_crud_versions_and_listing,
    concurrent_writers_use_optimistic_versions,
    groups_hierarchy_and_membership,
    streams_versions_and_order,
    jobs_executions_cancel_complete_delete,
    snapshot_jobs_complete_when_all_executions_end,
    device_writes_batch_start_next_and_updates,
    concurrent_last_executions_complete_the_job,
    device_writes_many_things_in_one_batch,
    concurrent_callers_get_their_own_outcomes,
    ended_updates_carry_the_pending_list_they_ask_for,
    ota_update_records,
    objects_follow_bucket_versioning,
    object_listing_with_delimiters_and_pages,
    acm_certificates_and_profile_references,
    signing_profiles_filters_and_pages,
    signing_jobs_idempotent_complete_and_list,
);

#[tokio::test]
async fn migrations_apply_once_and_data_survives_reconnect() {
    let dir = tempdir::Guard::new();
    let url = format!("sqlite://{}/m.db", dir.path.display());
    let s = SqlStore::connect(&url).await.expect("first");
    s.create_thing(&thing("kept")).await.expect("create");
    s.close().await;
    let s = SqlStore::connect(&url).await.expect("second");
    assert!(s.get_thing("kept").await.expect("get").is_some());
}

#[tokio::test]
async fn a_failed_device_batch_writes_nothing_and_the_store_goes_on() {
    // On SQLite a batch is one transaction on the device-write connection: a statement
    // failing midway must leave nothing written and no transaction open on it. Here the
    // completion statement fails (its table is renamed away) after the execution's UPDATE
    // has run. Another caller's write, in the same batch or not, is not failed with it.
    let dir = tempdir::Guard::new();
    let url = format!("sqlite://{}/batch.db", dir.path.display());
    let s = SqlStore::connect(&url).await.expect("store");
    s.create_job(
        &job("fail", TargetSelection::Snapshot, &[]),
        &[execution("fail", "x")],
    )
    .await
    .expect("create");
    s.create_job(
        &job("other", TargetSelection::Snapshot, &[]),
        &[execution("other", "y")],
    )
    .await
    .expect("create");
    let before = s
        .get_execution("fail", "x", None)
        .await
        .expect("get")
        .expect("exists");
    let mut done = before.clone();
    done.status = ExecutionStatus::Succeeded;
    done.version += 1;
    done.updated_ms = 9_000;

    sqlx::any::install_default_drivers();
    let side = sqlx::AnyPool::connect(&url).await.expect("side connection");
    sqlx::raw_sql("ALTER TABLE jobs RENAME TO jobs_away")
        .execute(&side)
        .await
        .expect("rename");
    let start_y = [DeviceWrite::StartNext {
        thing: "y".into(),
        status_details: None,
        now_ms: 9_000,
    }];
    let end_x = [update(done.clone())];
    let (failed, started) = tokio::join!(s.device_writes(&end_x), s.device_writes(&start_y));
    assert!(failed.is_err(), "the batch fails");
    match started
        .expect("the other caller's write is applied")
        .as_slice()
    {
        [DeviceWriteOutcome::Started(Some(e))] => {
            assert_eq!(
                (e.thing_name.as_str(), e.status),
                ("y", ExecutionStatus::InProgress)
            );
        }
        other => panic!("{other:?}"),
    }
    sqlx::raw_sql("ALTER TABLE jobs_away RENAME TO jobs")
        .execute(&side)
        .await
        .expect("rename back");
    side.close().await;
    assert_eq!(
        s.get_execution("fail", "x", None).await.expect("get"),
        Some(before),
        "nothing of the failed batch was written"
    );

    let out = s
        .device_writes(&[update(done.clone())])
        .await
        .expect("the next batch runs");
    assert_eq!(out, [DeviceWriteOutcome::Ended(vec![])]);
    assert_eq!(
        s.get_job("fail").await.expect("get").map(|j| j.status),
        Some(JobStatus::Completed)
    );
}

#[tokio::test]
async fn sqlite_urls_the_device_connection_cannot_share_are_refused() {
    // Devices' writes have a SQLite connection of their own (outside sqlx): it must open
    // the very database the pools use, or refuse to start.
    for url in ["sqlite::memory:", "sqlite://ignored.db?mode=memory"] {
        let refused = SqlStore::connect(url).await.err().map(|e| e.to_string());
        assert!(
            refused.as_deref().is_some_and(|m| m.contains("in-memory")),
            "{url}: {refused:?}"
        );
    }
}

#[tokio::test]
async fn a_url_naming_a_vfs_carries_devices_writes() {
    // The URL's VFS is used by every connection, the device-write one included. Dot-file
    // locking has no shared memory, so the database stays in rollback-journal mode: a
    // device connection that ignored the VFS would turn it to WAL (a `-wal` file) and the
    // pools' next transaction (the read below) would fail.
    let dir = tempdir::Guard::new();
    let url = format!(
        "sqlite://{}/v.db?mode=rwc&vfs=unix-dotfile",
        dir.path.display()
    );
    let s = SqlStore::connect(&url).await.expect("store");
    s.create_job(
        &job("v", TargetSelection::Snapshot, &[]),
        &[execution("v", "x")],
    )
    .await
    .expect("create");
    let start = [DeviceWrite::StartNext {
        thing: "x".into(),
        status_details: None,
        now_ms: 5_000,
    }];
    let out = s.device_writes(&start).await.expect("start-next");
    assert!(
        matches!(&out[..], [DeviceWriteOutcome::Started(Some(e))] if e.job_id == "v"),
        "{out:?}"
    );
    let e = s
        .get_execution("v", "x", None)
        .await
        .expect("get")
        .expect("exists");
    assert_eq!(e.status, ExecutionStatus::InProgress);
    assert!(
        !dir.path.join("v.db-wal").exists(),
        "the database went to WAL"
    );
    s.close().await;
}
