/**
 * One user-mode-linux guest holding a PostgreSQL 15 primary and its
 * streaming standby on LVM, each backed up by a compiled agent (dist/)
 * inside the guest against an appliance on the host (10.0.2.2):
 *
 * - db1: primary on a thin LV (bsnvg/pgdata, 64 KiB pool blocks, no
 *   zeroing), provider lvm-thin, tracking thin-delta;
 * - db2: standby on a plain LV (bsnvg/stdata) under a dm-era target
 *   (/dev/mapper/stera, 64 KiB era blocks, metadata on bsnvg/stmeta),
 *   provider lvm-classic, tracking dm-era; its quiesce is a replay pause.
 *
 * The guest is slow (one CPU under ptrace), so it is booted and the
 * clusters are built once; the host then drives it step by step through the
 * shared folder: it writes `do.STEP` (content: the step's argument), the
 * guest runs the step and writes `out.STEP` and `rc.STEP`. Used by
 * test/lvm/e2e-lvm.test.ts and scripts/bench-lvm.ts. The shared folder (with the
 * guest's disk) is removed by `stop`.
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, truncate, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { guestPgSetup } from './guest-pg-setup.js';
import { agentCli } from './processes.js';
import { runInGuest, type GuestResult } from './uml-guest.js';
import { waitFor } from './wait-for.js';

export const PRIMARY = { agent: 'db1', volume: 'pgdata' } as const;
export const STANDBY = { agent: 'db2', volume: 'stdata' } as const;

export interface GuestPgLabOptions {
  appliance: { url: string; tokens: Record<string, string> };
  /** The guest's own deadline (it powers off then whatever happens). */
  timeoutMs?: number;
  /** Extra postgresql.conf lines for the primary (the standby copies them). */
  pgConf?: string[];
  /** Extra initdb arguments (e.g. `--wal-segsize=1`). */
  initdbArgs?: string[];
  /** Size of each cluster's LV (default 256 MiB). */
  volumeMiB?: number;
  /** pgbench scale (default 2). */
  pgbenchScale?: number;
}

function agentConfig(o: GuestPgLabOptions, who: 'db1' | 'db2'): string {
  const appliance = o.appliance.url.replace('127.0.0.1', '10.0.2.2');
  const c = who === 'db1'
    ? {
      provider: 'lvm-thin', tracking: 'thin-delta',
      volumes: [{ name: PRIMARY.volume, device: '/dev/bsnvg/pgdata', mountpoint: '/srv/pgdata', chunkSize: 65536 }],
      postgres: { host: '127.0.0.1', port: 5432, user: 'postgres', role: 'primary' },
    }
    : {
      provider: 'lvm-classic', tracking: 'dm-era',
      volumes: [{ name: STANDBY.volume, device: '/dev/mapper/stera', lv: 'bsnvg/stdata', mountpoint: '/srv/standby', chunkSize: 65536 }],
      postgres: { host: '127.0.0.1', port: 5433, user: 'postgres', role: 'standby' },
    };
  return JSON.stringify({ appliance, insecure: true, agent: who, token: o.appliance.tokens[who], stateDir: `/var/lib/bsn-${who}`, ...c });
}

function script(shared: string, o: GuestPgLabOptions): string {
  return `S=${shared}
${guestPgSetup({ pgConf: o.pgConf, initdbArgs: o.initdbArgs, volumeMiB: o.volumeMiB, pgbenchScale: o.pgbenchScale })}
mkdir -p /var/lib/bsn-db1 /var/lib/bsn-db2
cat > /tmp/db1.json <<'JSON'
${agentConfig(o, 'db1')}
JSON
cat > /tmp/db2.json <<'JSON'
${agentConfig(o, 'db2')}
JSON
start_agent() { node ${agentCli()} run --config /tmp/$1.json >> $S/agent-$1.log 2>&1 & eval "AG_$1=$!"; }
start_agent db1; start_agent db2
q() { timeout 30 $PGBIN/psql -h 127.0.0.1 -p $1 -U postgres -d postgres -Atc "$2"; }
# What both servers and the devices say (a failed step's story).
diag() {
  q 5432 "select 'primary now', pg_current_wal_lsn(), pg_walfile_name(pg_current_wal_lsn())"
  q 5432 "select 'sender', state, sent_lsn, flush_lsn, replay_lsn from pg_stat_replication"
  q 5433 "select 'standby', pg_get_wal_replay_pause_state(), pg_last_wal_receive_lsn(), pg_last_wal_replay_lsn()"
  q 5433 "select 'receiver', status, flushed_lsn, latest_end_lsn from pg_stat_wal_receiver"
  echo "--- primary log"; tail -n 25 /tmp/pg1.log; echo "--- standby log"; tail -n 40 /tmp/pg2.log
  echo "--- mounts, devices"; grep /srv /proc/mounts; dmsetup info -c
}
# The standby has replayed everything the primary wrote (deadline 200 s: inside the host's 400 s for a step).
caught_up() {
  lsn=$(q 5432 "select pg_current_wal_lsn()")
  end=$(( $(date +%s) + 200 ))
  while [ $(date +%s) -lt $end ]; do [ "$(q 5433 "select pg_last_wal_replay_lsn() >= '$lsn'")" = t ] && return 0; sleep 0.5; done
  echo "the standby did not replay up to $lsn in 200 s"; diag; return 1
}
# ARG transactions by 2 clients, then the standby caught up; prints the table counts both must have.
step_pgbench() {
  timeout 200 $PGBIN/pgbench -h 127.0.0.1 -U postgres -n -c 2 -t $(( $1 / 2 )) postgres >/dev/null || { echo "pgbench failed or ran > 200 s"; diag; return 1; }
  caught_up || return 1
  q 5432 "select count(*) || ' ' || sum(delta) from pgbench_history"
}
# what LVM and the thin pool look like (a failure's story)
step_status() { dmsetup status; lvs -a --noheadings -o lv_name,lv_attr,data_percent,lv_tags bsnvg; }
# kill -9 of agent db1 while job ARG holds its snapshot; a foreign snapshot (another agent's tags) and a
# person's snapshot are made; db1 restarts and must remove its orphans and only those (deadline 300 s).
step_kill9() {
  dm=$(echo "bsnvg-bsn.pgdata.$1" | sed 's/-/--/g; s/^bsnvg--/bsnvg-/')
  for i in $(seq 3000); do dmsetup info "$dm" >/dev/null 2>&1 && break; sleep 0.1; done
  dmsetup info "$dm" >/dev/null 2>&1 || { echo "no snapshot $dm appeared"; return 1; }
  kill -9 $AG_db1; wait $AG_db1 2>/dev/null
  echo "--- killed"; lvs --noheadings -o lv_name,lv_tags bsnvg
  lvcreate -q -s -n other.snap --addtag blocksnap --addtag bsn.agent.other --addtag bsn.vol.pgdata --addtag bsn.job.other bsnvg/pgdata || return 1
  lvcreate -q -s -n manual.snap bsnvg/pgdata || return 1
  start_agent db1
  # done when the job's snapshot is gone and one thin-delta basis is left (the killed job's new one or the old)
  for i in $(seq 600); do t=$(lvs --noheadings -o lv_tags bsnvg); echo "$t" | grep -q "bsn.job.$1" || [ $(echo "$t" | grep -c bsn.basis) -gt 1 ] || break; sleep 0.5; done
  echo "--- restarted"; lvs --noheadings -o lv_name,lv_tags bsnvg
  lvremove -q -f bsnvg/other.snap bsnvg/manual.snap
}
while [ ! -e $S/stop ]; do
  for f in $S/do.*; do
    [ -e "$f" ] || continue
    c=\${f#$S/do.}; a=$(cat "$f"); rm -f "$f"
    step_$c $a > $S/out.$c 2>&1; echo $? > $S/rc.$c.tmp; mv $S/rc.$c.tmp $S/rc.$c
  done
  sleep 0.3
done
kill $AG_db1 $AG_db2; wait $AG_db1 $AG_db2
lvs --noheadings -o lv_name,lv_tags bsnvg > $S/lvs.final
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/standby/pg -m fast -w stop >/dev/null
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/pgdata/pg -m fast -w stop >/dev/null
echo stopped > $S/stopped
`;
}

export class GuestPgLab {
  private settled = false;
  private result: GuestResult | null = null;

  private constructor(readonly shared: string, private readonly guest: Promise<GuestResult>) {
    void guest.then((r) => (this.result = r), () => undefined).finally(() => (this.settled = true));
  }

  /** Boots the guest and builds both clusters; the agents connect by themselves (see `connected`). */
  static async start(o: GuestPgLabOptions): Promise<GuestPgLab> {
    if (!existsSync(agentCli())) throw new Error(`${agentCli()} missing: run npm run build`);
    const shared = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-lab-'));
    // The guest's disk (sparse, 1 GiB) lives in the shared folder: removed with it.
    const disk = path.join(shared, 'disk.img');
    await writeFile(disk, '');
    await truncate(disk, 1024 << 20);
    const guest = runInGuest({ script: script(shared, o), disks: [{ file: disk }], network: true, shared: [shared], timeoutMs: o.timeoutMs ?? 1_500_000 });
    return new GuestPgLab(shared, guest);
  }

  /** Waits until `isConnected()` (both agents dialled in), or fails with the guest's output. */
  async connected(isConnected: () => boolean, timeoutMs = 400_000): Promise<void> {
    await waitFor('the agents in the guest to connect', () => isConnected() || this.settled, { timeoutMs, everyMs: 500 });
    if (!isConnected()) throw new Error(`agents did not connect: ${await this.explain()}`);
  }

  /** Runs STEP in the guest (see the script), returns its output; throws on failure with the guest's story. */
  async step(name: 'pgbench' | 'kill9' | 'status', arg: string, timeoutMs = 400_000): Promise<string> {
    const rc = path.join(this.shared, `rc.${name}`);
    await rm(rc, { force: true });
    await writeFile(path.join(this.shared, `do.${name}`), arg);
    await waitFor(`step ${name} in the guest`, () => existsSync(rc) || this.settled, { timeoutMs, everyMs: 300 });
    const out = await readFile(path.join(this.shared, `out.${name}`), 'utf8').catch(() => '');
    if (!existsSync(rc)) throw new Error(`step ${name}: the guest ended\n${out}\n${await this.explain()}`);
    const code = Number((await readFile(rc, 'utf8')).trim());
    if (code !== 0) throw new Error(`step ${name} failed (${code}):\n${out}\n${await this.agentLogs()}`);
    return out;
  }

  /** Each agent's warnings and errors and its last lines. */
  async agentLogs(): Promise<string> {
    const tail = async (a: string) => {
      const lines = (await readFile(path.join(this.shared, `agent-${a}.log`), 'utf8').catch(() => '')).split('\n');
      return [...lines.filter((l) => /"level":[456]0/.test(l)).slice(-30), '...', ...lines.slice(-8)].join('\n');
    };
    return `--- agent db1 ---\n${await tail('db1')}\n--- agent db2 ---\n${await tail('db2')}`;
  }

  async explain(): Promise<string> {
    const r = this.settled ? this.result : null;
    const story = r ? `guest exit ${r.code}${r.timedOut ? ' (timed out)' : ''} after ${r.seconds.toFixed(1)} s\n${r.output}\n--- console ---\n${r.console.slice(-2000)}` : 'guest still running';
    return `${story}\n${await this.agentLogs()}`;
  }

  /** Stops the agents and clusters, powers the guest off; returns `lvs` (name, tags) at the end. Removes the shared folder. */
  async stop(): Promise<{ result: GuestResult | null; lvs: string }> {
    await writeFile(path.join(this.shared, 'stop'), '').catch(() => undefined);
    const result = await this.guest.catch(() => null);
    const lvs = await readFile(path.join(this.shared, 'lvs.final'), 'utf8').catch(() => '');
    await rm(this.shared, { recursive: true, force: true });
    return { result, lvs };
  }
}
