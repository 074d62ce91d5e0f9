//! The auth service's user store: one behaviour suite run on both backends
//! (SQLite in a temporary directory, MySQL in a fresh database), and auth
//! replicas sharing one MySQL database: a user registered through one logs
//! in through another, an owner claimed through one is seen by the other,
//! and of many concurrent claims of one account across replicas exactly
//! one owner wins.

use std::sync::Arc;

use shardpay_reference::auth::users::{MysqlUsers, SqliteUsers, UserStore};
use shardpay_reference::auth::{AuthConfig, AuthError, AuthService, Role, Stores};
use shardpay_reference::codes::ErrorCode;
use shardpay_reference::ledger::mysql::MysqlConfig;

use crate::support::{mysql_server, TEST_SECRET};

/// A fresh database on the MySQL test server, dropped when this is (also
/// when the test fails).
pub(crate) struct FreshDatabase {
    server: String,
    name: String,
}

impl FreshDatabase {
    /// A name no other test uses; [`MysqlUsers::connect`] creates it.
    pub(crate) fn new(server: &str) -> FreshDatabase {
        let name = format!("t{}_auth", &uuid::Uuid::new_v4().simple().to_string()[..12]);
        FreshDatabase {
            server: server.to_string(),
            name,
        }
    }

    pub(crate) fn url(&self) -> String {
        format!("{}/{}", self.server, self.name)
    }
}

impl Drop for FreshDatabase {
    fn drop(&mut self) {
        let (server, name) = (self.server.clone(), self.name.clone());
        // A runtime of its own: this may run inside a test's runtime.
        let dropped = std::thread::spawn(move || {
            let runtime = tokio::runtime::Builder::new_current_thread()
                .enable_all()
                .build()
                .unwrap();
            runtime.block_on(async {
                use sqlx::Connection;
                let mut admin = sqlx::MySqlConnection::connect(&server).await?;
                sqlx::query(&format!("DROP DATABASE IF EXISTS {name}"))
                    .execute(&mut admin)
                    .await?;
                anyhow::Ok(())
            })
        })
        .join();
        if !matches!(dropped, Ok(Ok(()))) {
            eprintln!("could not drop test database {}", self.name);
        }
    }
}

fn assert_unknown_owner(result: Result<Vec<bool>, AuthError>, owner: &str) {
    match result {
        Err(AuthError::Invalid(ErrorCode::UnknownOwner, message)) => {
            assert!(
                message.contains(&format!("no user named {owner};")),
                "{message}"
            );
        }
        other => panic!("{owner}: expected unknown_owner, got {other:?}"),
    }
}

/// Registration, logins' look-ups and the bootstrap admin.
async fn users_suite(store: &dyn UserStore) {
    for (name, role) in [
        ("alice", Role::User),
        ("bob", Role::User),
        ("ops", Role::Admin),
        ("svc", Role::Service),
        ("admin", Role::User),
    ] {
        store
            .add_user(name, &format!("hash-of-{name}"), role)
            .await
            .unwrap();
    }
    let err = store
        .add_user("alice", "another-hash", Role::Admin)
        .await
        .unwrap_err();
    assert!(
        matches!(&err, AuthError::Taken(name) if name == "alice"),
        "{err:?}"
    );
    assert_eq!(err.to_string(), "username alice is taken");
    let alice = store.credentials("alice").await.unwrap().unwrap();
    assert_eq!(
        (alice.password_hash.as_str(), alice.role.as_str()),
        ("hash-of-alice", "user"),
        "a taken name keeps its first user"
    );
    assert_eq!(
        store.credentials("svc").await.unwrap().unwrap().role,
        "service"
    );
    // Names compare as bytes.
    assert_eq!(store.credentials("Alice").await.unwrap(), None);
    assert_eq!(store.credentials("nobody").await.unwrap(), None);
    store
        .add_user("Alice", "hash-of-Alice", Role::User)
        .await
        .unwrap();
    // The bootstrap admin takes over the name `admin`, then resets it.
    for hash in ["admin-hash-1", "admin-hash-2"] {
        store.put_admin(hash).await.unwrap();
        let admin = store.credentials("admin").await.unwrap().unwrap();
        assert_eq!(
            (admin.password_hash.as_str(), admin.role.as_str()),
            (hash, "admin")
        );
    }
}

/// Owners: checks, claims, refusals, and concurrent claims of one account.
async fn owners_suite(store: Arc<dyn UserStore>) {
    assert_eq!(store.check_owners(&[]).await.unwrap(), Vec::<bool>::new());
    assert_eq!(store.claim_owners(&[]).await.unwrap(), Vec::<bool>::new());
    let free = store
        .check_owners(&[("alice-main", "alice"), ("bob-main", "bob")])
        .await
        .unwrap();
    assert_eq!(free, [true, true]);
    assert_eq!(
        store.owner_of("alice-main").await.unwrap(),
        None,
        "a check records nothing"
    );
    // Owners are users: not admins, services or strangers; one such owner
    // refuses the whole claim.
    for owner in ["ops", "svc", "nobody", "admin"] {
        assert_unknown_owner(store.check_owners(&[("x-1", owner)]).await, owner);
        assert_unknown_owner(
            store
                .claim_owners(&[("alice-main", "alice"), ("x-1", owner)])
                .await,
            owner,
        );
    }
    assert_eq!(store.owner_of("alice-main").await.unwrap(), None);
    // Claims: the first owner of an account stays.
    let owned = store
        .claim_owners(&[
            ("alice-main", "alice"),
            ("bob-main", "bob"),
            ("alice-main", "bob"),
        ])
        .await
        .unwrap();
    assert_eq!(owned, [true, true, false]);
    assert_eq!(
        store.owner_of("alice-main").await.unwrap().as_deref(),
        Some("alice")
    );
    assert_eq!(
        store.owner_of("bob-main").await.unwrap().as_deref(),
        Some("bob")
    );
    assert_eq!(store.owner_of("nobody-main").await.unwrap(), None);
    assert_eq!(
        store.claim_owners(&[("alice-main", "bob")]).await.unwrap(),
        [false]
    );
    assert_eq!(
        store
            .claim_owners(&[("alice-main", "alice")])
            .await
            .unwrap(),
        [true]
    );
    assert_eq!(
        store
            .claim_owners(&[("alice-main", "Alice")])
            .await
            .unwrap(),
        [false]
    );
    let free = store
        .check_owners(&[
            ("alice-main", "bob"),
            ("alice-main", "alice"),
            ("new", "bob"),
        ])
        .await
        .unwrap();
    assert_eq!(free, [false, true, true]);
    concurrent_claims(store).await;
}

/// Claims of one account for alice and bob at once: exactly one wins.
async fn concurrent_claims(store: Arc<dyn UserStore>) {
    for round in 0..5 {
        let account = format!("contested-{round}");
        let claims: Vec<_> = (0..16)
            .map(|i| {
                let store = Arc::clone(&store);
                let account = account.clone();
                let owner = if i % 2 == 0 { "alice" } else { "bob" };
                tokio::spawn(async move {
                    let owned = store.claim_owners(&[(&account, owner)]).await.unwrap();
                    (owner, owned[0])
                })
            })
            .collect();
        let mut winners = std::collections::HashSet::new();
        for claim in claims {
            let (owner, won) = claim.await.unwrap();
            if won {
                winners.insert(owner);
            }
        }
        let owner = store.owner_of(&account).await.unwrap().unwrap();
        assert_eq!(winners.into_iter().collect::<Vec<_>>(), [owner.as_str()]);
    }
}

async fn store_suite(store: Arc<dyn UserStore>) {
    users_suite(store.as_ref()).await;
    owners_suite(store).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn sqlite_user_store_passes_the_auth_store_suite() {
    let dir = tempfile::tempdir().unwrap();
    let store = SqliteUsers::open(Some(&dir.path().join("auth.sqlite"))).unwrap();
    store_suite(Arc::new(store)).await;
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn mysql_user_store_passes_the_auth_store_suite() {
    let Some(server) = mysql_server() else {
        return;
    };
    let database = FreshDatabase::new(&server);
    let store = MysqlUsers::connect(&database.url(), &MysqlConfig::default())
        .await
        .unwrap();
    store_suite(Arc::new(store)).await;
    // A second start finds the database and its tables, and keeps the rows.
    let again = MysqlUsers::connect(&database.url(), &MysqlConfig::default())
        .await
        .unwrap();
    assert_eq!(
        again.owner_of("bob-main").await.unwrap().as_deref(),
        Some("bob")
    );
}

/// An auth service over the MySQL database at `url`, as one replica.
async fn replica(url: &str) -> Arc<AuthService> {
    let mut config = AuthConfig::new(TEST_SECRET);
    config.argon2_memory_kib = 64;
    config.argon2_iterations = 1;
    config.login_per_user.max = 0;
    config.login_per_address.max = 0;
    config.admin_password = Some("admin-password".into());
    let users = MysqlUsers::connect(url, &MysqlConfig::default())
        .await
        .unwrap();
    let auth = AuthService::with_users(config, Arc::new(users), Stores::memory()).unwrap();
    auth.bootstrap_admin().await.unwrap();
    Arc::new(auth)
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn auth_replicas_on_one_mysql_database_serve_the_same_users_and_owners() {
    let Some(server) = mysql_server() else {
        return;
    };
    let database = FreshDatabase::new(&server);
    let (one, two) = (
        replica(&database.url()).await,
        replica(&database.url()).await,
    );
    one.register("dora", "dora-password", Role::User)
        .await
        .unwrap();
    let tokens = two
        .login("dora", "dora-password", "10.0.0.1")
        .await
        .unwrap();
    assert_eq!(
        (tokens.username.as_str(), tokens.role),
        ("dora", Role::User)
    );
    assert!(matches!(
        two.login("dora", "wrong-password", "10.0.0.1").await,
        Err(AuthError::BadCredentials)
    ));
    assert!(matches!(
        two.register("dora", "other-password", Role::User).await,
        Err(AuthError::Taken(_))
    ));
    two.login("admin", "admin-password", "10.0.0.1")
        .await
        .unwrap();
    two.register("erin", "erin-password", Role::User)
        .await
        .unwrap();
    // An owner claimed through one replica is the owner at the other.
    assert_eq!(one.claim(&[("dora-main", "dora")]).await.unwrap(), [true]);
    assert_eq!(
        two.owner_of("dora-main").await.unwrap().as_deref(),
        Some("dora")
    );
    assert_eq!(two.claim(&[("dora-main", "erin")]).await.unwrap(), [false]);
    assert_eq!(
        two.check_owners(&[("dora-main", "erin")]).await.unwrap(),
        [false]
    );
    // And an admin's assignment through the other replica.
    assert!(two.assign_owner("erin-main", "erin").await.unwrap());
    assert_eq!(
        one.owner_of("erin-main").await.unwrap().as_deref(),
        Some("erin")
    );
    assert!(!one.assign_owner("erin-main", "dora").await.unwrap());
}

#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn concurrent_claims_across_auth_replicas_have_exactly_one_winner() {
    let Some(server) = mysql_server() else {
        return;
    };
    let database = FreshDatabase::new(&server);
    let replicas = [
        replica(&database.url()).await,
        replica(&database.url()).await,
    ];
    let owners: Vec<String> = (0..8).map(|i| format!("owner{i}")).collect();
    for owner in &owners {
        replicas[0]
            .register(owner, "owner-password", Role::User)
            .await
            .unwrap();
    }
    for round in 0..10 {
        let account = format!("contested-{round}");
        let barrier = Arc::new(tokio::sync::Barrier::new(32));
        let claims: Vec<_> = (0..32)
            .map(|i| {
                let auth = Arc::clone(&replicas[i % 2]);
                let owner = owners[(i / 2) % owners.len()].clone();
                let (account, barrier) = (account.clone(), Arc::clone(&barrier));
                tokio::spawn(async move {
                    barrier.wait().await;
                    let owned = auth.claim(&[(&account, &owner)]).await.unwrap();
                    (owner, owned[0])
                })
            })
            .collect();
        let mut answers = Vec::new();
        for claim in claims {
            answers.push(claim.await.unwrap());
        }
        let winner = replicas[0].owner_of(&account).await.unwrap().unwrap();
        assert_eq!(
            replicas[1].owner_of(&account).await.unwrap().as_deref(),
            Some(winner.as_str())
        );
        for (owner, won) in answers {
            assert_eq!(
                won,
                owner == winner,
                "{account}: {owner} answered {won}, {winner} owns it"
            );
        }
    }
}

/// `serve` with MySQL: two processes given the same auth database serve the
/// same users over HTTP, and neither writes `auth.sqlite`.
#[tokio::test(flavor = "multi_thread", worker_threads = 4)]
async fn two_served_processes_share_users_through_the_auth_mysql_database() {
    use shardpay_reference::app::{self, AuthSetup, ServeConfig};
    let Some(server) = mysql_server() else {
        return;
    };
    let (shard, users) = (FreshDatabase::new(&server), FreshDatabase::new(&server));
    {
        use sqlx::Connection;
        let mut admin = sqlx::MySqlConnection::connect(&server).await.unwrap();
        sqlx::query(&format!("CREATE DATABASE {}", shard.name))
            .execute(&mut admin)
            .await
            .unwrap();
    }
    let dir = tempfile::tempdir().unwrap();
    let mut urls = Vec::new();
    let mut stops = Vec::new();
    for _ in 0..2 {
        let mut config = ServeConfig::new(dir.path());
        config.bind = "127.0.0.1:0".parse().unwrap();
        config.mysql_urls = Some(vec![shard.url()]);
        config.auth_mysql_url = Some(users.url());
        let mut auth = AuthConfig::new(TEST_SECRET);
        auth.argon2_memory_kib = 64;
        auth.argon2_iterations = 1;
        config.auth = AuthSetup::On {
            config: auth,
            redis: None,
            redis_prefix: String::new(),
            dev: false,
        };
        let app = app::build(config).await.unwrap();
        urls.push(format!("http://{}", app.addr));
        let (stop, stopped) = tokio::sync::oneshot::channel::<()>();
        tokio::spawn(app.run_until(async {
            let _ = stopped.await;
        }));
        stops.push(stop);
    }
    let client = reqwest::Client::new();
    let body = serde_json::json!({"username": "dora", "password": "dora-password"});
    let registered = client
        .post(format!("{}/v1/auth/register", urls[0]))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(registered.status(), 201);
    let login = client
        .post(format!("{}/v1/auth/login", urls[1]))
        .json(&body)
        .send()
        .await
        .unwrap();
    assert_eq!(login.status(), 200, "{:?}", login.text().await);
    assert!(!dir.path().join("auth.sqlite").exists());
    for stop in stops {
        let _ = stop.send(());
    }
}
