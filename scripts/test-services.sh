#!/usr/bin/env bash
# Throwaway PostgreSQL, ZooKeeper and Redis (Ray's GCS fault tolerance) for
# the test suite, on free ports, in a private folder. `start DIR` prints
# shell exports; `stop DIR` ends them.
set -euo pipefail

PG_BIN=${PG_BIN:-/usr/lib/postgresql/15/bin}
ZK_JAR=${ZK_JAR:-/usr/share/java/zookeeper.jar}

free_ports() {
  # all bound at once, so the ports differ (ports probed one by one can repeat)
  python3 -c '
import socket, sys
probes = [socket.socket() for _ in range(int(sys.argv[1]))]
for probe in probes:
    probe.bind(("127.0.0.1", 0))
print(" ".join(str(probe.getsockname()[1]) for probe in probes))' "$1"
}

as_postgres() {
  # initdb and postgres refuse to run as root
  if [ "$(id -u)" = 0 ]; then runuser -u postgres -- "$@"; else "$@"; fi
}

start() {
  local dir=$1
  mkdir -p "$dir"
  local pg_port zk_port redis_port
  read -r pg_port zk_port redis_port < <(free_ports 3)

  # PostgreSQL: a fresh cluster with trust auth, fsync off (throwaway data);
  # CHRONORAY_DURABLE=1 keeps PostgreSQL's durable defaults (the chaos harness
  # restarts it with -m immediate and must not lose acknowledged commits).
  local durability="-c fsync=off -c synchronous_commit=off -c full_page_writes=off"
  [ "${CHRONORAY_DURABLE:-0}" = 1 ] && durability="-c fsync=on -c synchronous_commit=on -c full_page_writes=on"
  mkdir -p "$dir/pg"
  [ "$(id -u)" = 0 ] && chown postgres "$dir/pg" && chmod 700 "$dir/pg" && chmod o+x "$dir"
  as_postgres "$PG_BIN/initdb" -D "$dir/pg/data" -U postgres -A trust --no-sync >"$dir/pg-initdb.log" 2>&1
  as_postgres "$PG_BIN/pg_ctl" -D "$dir/pg/data" -l "$dir/pg/server.log" -w -t 60 start \
    -o "-p $pg_port -k $dir/pg -c listen_addresses=127.0.0.1 $durability -c max_connections=300" \
    >"$dir/pg-start.log" 2>&1 || { cat "$dir/pg/server.log" >&2; exit 1; }

  # ZooKeeper: standalone, its own data folder
  mkdir -p "$dir/zk/data"
  cat >"$dir/zk/zoo.cfg" <<CFG
tickTime=500
dataDir=$dir/zk/data
clientPort=$zk_port
clientPortAddress=127.0.0.1
maxSessionTimeout=20000
minSessionTimeout=1000
admin.enableServer=false
4lw.commands.whitelist=ruok,stat
CFG
  start-zookeeper "$dir"

  # Redis: where a fault-tolerant Ray GCS keeps its tables; nothing on disk
  mkdir -p "$dir/redis"
  redis-server --port "$redis_port" --bind 127.0.0.1 --save "" --appendonly no \
    --daemonize yes --pidfile "$dir/redis/pid" --logfile "$dir/redis/server.log" --dir "$dir/redis"
  for _ in $(seq 1 100); do
    redis-cli -p "$redis_port" ping >/dev/null 2>&1 && break
    sleep 0.1
  done

  cat >"$dir/env" <<ENV
export CHRONORAY_TEST_POSTGRES_URL=postgresql+psycopg://postgres@127.0.0.1:$pg_port/postgres
export CHRONORAY_TEST_PG_PORT=$pg_port
export CHRONORAY_TEST_PG_BIN=$PG_BIN
export CHRONORAY_TEST_ZOOKEEPER_HOSTS=127.0.0.1:$zk_port
export CHRONORAY_TEST_ZOOKEEPER_DIR=$dir/zk
export CHRONORAY_TEST_REDIS_ADDRESS=127.0.0.1:$redis_port
ENV
  cat "$dir/env"
}

# The ZooKeeper of DIR alone, with the config and data `start` wrote: the
# fault tests stop it for a while and start it again on the same port.
start-zookeeper() {
  local dir=$1 zk_port
  zk_port=$(sed -n 's/^clientPort=//p' "$dir/zk/zoo.cfg")
  nohup java -Dzookeeper.log.dir="$dir/zk" -cp "$ZK_JAR:/etc/zookeeper/conf" \
    org.apache.zookeeper.server.quorum.QuorumPeerMain "$dir/zk/zoo.cfg" >>"$dir/zk/server.log" 2>&1 &
  echo $! >"$dir/zk/pid"
  for _ in $(seq 1 100); do
    if python3 -c "import socket,sys; s=socket.create_connection(('127.0.0.1',$zk_port),1); s.sendall(b'ruok'); sys.exit(0 if s.recv(4)==b'imok' else 1)" 2>/dev/null; then
      return 0
    fi
    sleep 0.2
  done
  echo "ZooKeeper did not start; see $dir/zk/server.log" >&2
  return 1
}

stop-zookeeper() {
  local dir=$1 pid
  [ -f "$dir/zk/pid" ] || return 0
  pid=$(cat "$dir/zk/pid")
  kill "$pid" 2>/dev/null || true
  for _ in $(seq 1 50); do kill -0 "$pid" 2>/dev/null || return 0; sleep 0.1; done
  kill -9 "$pid" 2>/dev/null || true
}

stop() {
  local dir=$1
  stop-zookeeper "$dir"
  if [ -f "$dir/redis/pid" ]; then kill "$(cat "$dir/redis/pid")" 2>/dev/null || true; fi
  if [ -d "$dir/pg/data" ]; then as_postgres "$PG_BIN/pg_ctl" -D "$dir/pg/data" -m immediate stop >/dev/null 2>&1 || true; fi
}

"$@"
