/**
 * End to end on real LVM: PostgreSQL 15 on a thin LV in a user-mode-linux
 * guest, the compiled agent (`npm run build`) inside the guest with
 * provider lvm-thin and tracking thin-delta, the appliance in this process
 * on 127.0.0.1 (10.0.2.2 from the guest). A full, pgbench, then an audited
 * incremental (the audit checks the thin-delta bitmap against a full digest
 * comparison: 0 missed chunks), then a plain incremental that reads only the
 * chunks thin_delta marked. After the agent stops, no job snapshot of the
 * agent is left in the guest (the thin-delta basis stays, by design).
 */
import { existsSync } from 'node:fs';
import { mkdtemp, readFile, rm, writeFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { describe, expect, it } from 'vitest';
import { startAppliance } from '../../scripts/lab/appliance-harness.js';
import { agentCli } from '../../scripts/lab/processes.js';
import { waitFor } from '../support/wait-for.js';
import { explain, labSkipReason, runGuestScript } from './guest-runner.js';

type Stats = Record<string, unknown> & { changeSource: string; fallbackReason: string; auditMissed: number; audited: boolean; trackedChunks: number };

function guestScript(shared: string, url: string, token: string): string {
  const config = {
    appliance: url, insecure: true, agent: 'db1', token, stateDir: '/var/lib/bsn-agent', provider: 'lvm-thin', tracking: 'thin-delta',
    volumes: [{ name: 'pgdata', device: '/dev/bsnvg/pgdata', mountpoint: '/srv/pgdata', chunkSize: 65536 }],
    postgres: { host: '127.0.0.1', port: 5432, user: 'postgres', role: 'primary' },
  };
  return `set -e
S=${shared}
PGBIN=/usr/lib/postgresql/15/bin
cd /  # the run folder is root-only: postgres cannot start in it
pvcreate -q -ff -y /dev/ubda; vgcreate -q bsnvg /dev/ubda
lvcreate -q -L 900M --chunksize 64k -Zn -T bsnvg/pool
lvcreate -q -V 256M -T bsnvg/pool -n pgdata
mkfs.ext4 -q -E nodiscard /dev/bsnvg/pgdata; mkdir -p /srv/pgdata; mount /dev/bsnvg/pgdata /srv/pgdata
mkdir -p /srv/pgdata/pg /var/lib/bsn-agent; chown postgres:postgres /srv/pgdata/pg
runuser -u postgres -- $PGBIN/initdb -D /srv/pgdata/pg -A trust >/dev/null
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/pgdata/pg -l /tmp/pg.log -o "-p 5432 -k /tmp -c listen_addresses=127.0.0.1" -w start >/dev/null
$PGBIN/pgbench -h 127.0.0.1 -U postgres -i -s 2 -q postgres 2>/dev/null
cat > /tmp/agent.json <<'JSON'
${JSON.stringify(config)}
JSON
node ${agentCli()} run --config /tmp/agent.json > $S/agent.log 2>&1 &
AG=$!
step() { while [ ! -e $S/$1 ] && [ ! -e $S/stop ]; do sleep 0.3; done; }
step pgbench
$PGBIN/pgbench -h 127.0.0.1 -U postgres -t 300 -c 2 postgres > $S/pgbench.log 2>&1
touch $S/pgbench.done
step stop
kill $AG; wait $AG || true
lvs --noheadings -o lv_name,lv_tags bsnvg > $S/lvs.txt
runuser -u postgres -- $PGBIN/pg_ctl -D /srv/pgdata/pg -m fast -w stop >/dev/null
`;
}

describe.skipIf(labSkipReason)('LVM thin end to end in the guest', () => {
  it('full, pgbench, audited thin-delta incremental: 0 missed chunks; no job snapshot left', async () => {
    expect(existsSync(agentCli()), `${agentCli()} missing: run npm run build`).toBe(true);
    const appl = await startAppliance(['db1'], { auditEvery: 0 });
    const shared = await mkdtemp(path.join(os.tmpdir(), 'bsn-lvm-e2e-'));
    let guest: ReturnType<typeof runGuestScript> | null = null;
    let settled = false;
    try {
      const url = appl.url.replace('127.0.0.1', '10.0.2.2');
      guest = runGuestScript(guestScript(shared, url, appl.tokens.db1!), { network: true, shared: [shared], disksMiB: [1024], timeoutMs: 540_000 });
      void guest.finally(() => (settled = true));
      const connected = () => appl.app.router.connectedAgents().some((a) => a.agent === 'db1');
      await waitFor('the agent in the guest to connect', () => connected() || settled, { timeoutMs: 240_000, everyMs: 500 });
      if (!connected()) throw new Error(`agent did not connect: ${explain(await guest)}\n${await readFile(path.join(shared, 'agent.log'), 'utf8').catch(() => '')}`);

      const full = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
      expect(full, JSON.stringify(full)).toMatchObject({ ok: true });

      await writeFile(path.join(shared, 'pgbench'), '');
      await waitFor('pgbench in the guest', () => existsSync(path.join(shared, 'pgbench.done')) || settled, { timeoutMs: 240_000, everyMs: 500 });

      const job = appl.app.router.startJob('db1', 'pgdata', 'incremental', { audit: true });
      const inc = await job.done;
      expect(inc, JSON.stringify(inc)).toMatchObject({ ok: true });
      const stats = appl.app.catalog.job(job.id)!.stats as Stats;
      // An audited job sends what a full digest comparison finds and checks the tracker's bitmap against it.
      expect(stats.changeSource, JSON.stringify(stats)).toBe('digest-compare (audit)');
      expect(stats.fallbackReason).toBe('');
      expect(stats.audited).toBe(true);
      expect(stats.auditMissed).toBe(0);
      expect(stats.trackedChunks).toBeGreaterThan(0);
      console.log(`lvm-thin e2e audit: tracked ${stats.trackedChunks} chunks, really changed ${String(stats.auditChanged)}, missed ${stats.auditMissed}, ` +
        `digest compare read ${String(stats.bytesRead)} bytes, snapshot frozen ${String(stats.freezeSeconds)} s`);

      // The audit gave its generation back: the next incremental reads only what thin_delta marked.
      const next = appl.app.router.startJob('db1', 'pgdata', 'incremental');
      expect(await next.done).toMatchObject({ ok: true });
      const ns = appl.app.catalog.job(next.id)!.stats as Stats;
      expect(ns.changeSource, JSON.stringify(ns)).toBe('tracker');
      expect(ns.fallbackReason).toBe('');
      expect(Number(ns.chunksRead)).toBeLessThan(Number(ns.chunksTotal));
      console.log(`lvm-thin e2e tracker incremental: read ${String(ns.bytesRead)} bytes (${String(ns.chunksRead)} of ${String(ns.chunksTotal)} chunks)`);

      await writeFile(path.join(shared, 'stop'), '');
      const r = await guest;
      expect(r.code, explain(r)).toBe(0);
      const lvs = await readFile(path.join(shared, 'lvs.txt'), 'utf8');
      expect(lvs).not.toMatch(/bsn\.job\./); // the job snapshots are gone; the thin-delta basis stays
      expect(lvs).toMatch(/bsn\.basis/);
    } finally {
      if (guest && !settled) await writeFile(path.join(shared, 'stop'), '').catch(() => undefined);
      if (guest) await guest.catch(() => undefined);
      await appl.close();
      await rm(shared, { recursive: true, force: true });
    }
  }, 600_000);
});
