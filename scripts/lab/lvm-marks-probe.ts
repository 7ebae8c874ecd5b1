/**
 * What the LVM trackers' extra marks are (issue 10: marked / really changed
 * chunks > 1.1 at 64 KiB). One guest, the bench's set-up (scripts/lab/
 * guest-pg-lab.ts: PostgreSQL primary on a thin LV, streaming standby on a
 * plain LV under dm-era), the trackers and providers of the agent driven
 * like a job's capture (agent/capture.ts: quiesce → prepareSwitch →
 * snapshot → completeSwitch → unquiesce), 2 000 pgbench transactions per
 * interval. Each interval's snapshots are kept until the next one, so the
 * probe knows, per marked chunk: really changed (bytes differ between the
 * two snapshots) or not, zero in both, recorded by the switch's drain (the
 * race window, which is also in the next generation), and what lives there
 * (debugfs icheck/ncheck, dumpe2fs: WAL, relation files, the journal,
 * inode tables, bitmaps, free space).
 *
 *   npx tsx scripts/lab/lvm-marks-probe.ts [--intervals 3] [--pg-conf 'wal_init_zero = off; wal_recycle = off'] [--initdb-args --wal-segsize=1] [--out FILE.json]
 *
 * `--pg-conf`: postgresql.conf lines for the primary (the standby copies them), separated by `;`.
 */
import { createHash } from 'node:crypto';
import { open, mkdtemp, rm, truncate, writeFile, readFile } from 'node:fs/promises';
import os from 'node:os';
import path from 'node:path';
import { execa } from 'execa';

const arg = (name: string) => (process.argv.includes(name) ? process.argv[process.argv.indexOf(name) + 1] : undefined);
const CHUNK = 65536;

async function host(): Promise<void> {
  const { runInGuest } = await import('./uml-guest.js');
  const { repoRoot } = await import('./processes.js');
  const dir = await mkdtemp(path.join(os.tmpdir(), 'bsn-marks-'));
  try {
    const disk = path.join(dir, 'disk.img');
    await writeFile(disk, '');
    await truncate(disk, 1536 << 20);
    const { guestPgSetup } = await import('./guest-pg-setup.js');
    const pgConf = (arg('--pg-conf') ?? '').split(';').map((l) => l.trim()).filter(Boolean);
    const initdbArgs = (arg('--initdb-args') ?? '').split(/\s+/).filter(Boolean);
    const script = `${guestPgSetup({ pgConf, initdbArgs })}
cd ${repoRoot()} && node node_modules/tsx/dist/cli.mjs scripts/lab/lvm-marks-probe.ts guest ${arg('--intervals') ?? 3} ${dir}/report.json
`;
    const r = await runInGuest({ script, disks: [{ file: disk }], shared: [dir], timeoutMs: 1_800_000 });
    console.log(r.output.slice(-6000));
    if (r.code !== 0) throw new Error(`guest exit ${r.code}${r.timedOut ? ' (timed out)' : ''}\n${r.console.slice(-3000)}`);
    const report = await readFile(path.join(dir, 'report.json'), 'utf8');
    if (arg('--out')) await writeFile(arg('--out')!, report);
    console.log(`guest ${r.seconds.toFixed(0)} s`);
  } finally {
    await rm(dir, { recursive: true, force: true });
  }
}

// ---------------------------------------------------------------- in the guest

const PGBIN = '/usr/lib/postgresql/15/bin';
const count = (xs: string[]): Record<string, number> => {
  const r: Record<string, number> = {};
  for (const x of xs) r[x] = (r[x] ?? 0) + 1;
  return r;
};

async function chunkDigests(dev: string, size: number): Promise<{ digest: string[]; zero: boolean[] }> {
  const fh = await open(dev, 'r');
  const buf = Buffer.alloc(CHUNK);
  const zeros = Buffer.alloc(CHUNK);
  const digest: string[] = [];
  const zero: boolean[] = [];
  try {
    for (let off = 0; off < size; off += CHUNK) {
      const { bytesRead } = await fh.read(buf, 0, CHUNK, off);
      const v = buf.subarray(0, bytesRead);
      zero.push(v.equals(zeros.subarray(0, bytesRead)));
      digest.push(createHash('sha256').update(v).digest('hex'));
    }
  } finally {
    await fh.close();
  }
  return { digest, zero };
}

/** ext4 metadata block ranges from dumpe2fs: [first, last, kind]. */
async function metadataRanges(dev: string): Promise<Array<[number, number, string]>> {
  const out = (await execa('dumpe2fs', [dev], { reject: false })).stdout;
  const r: Array<[number, number, string]> = [];
  const add = (re: RegExp, kind: string) => {
    for (const m of out.matchAll(re)) r.push([Number(m[1]), Number(m[2] ?? m[1]), kind]);
  };
  add(/superblock at (\d+)/gi, 'superblock');
  add(/Group descriptors at (\d+)-(\d+)/g, 'group descriptors');
  add(/Reserved GDT blocks at (\d+)-(\d+)/g, 'reserved GDT');
  add(/Block bitmap at (\d+)/g, 'block bitmap');
  add(/Inode bitmap at (\d+)/g, 'inode bitmap');
  add(/Inode table at (\d+)-(\d+)/g, 'inode table');
  return r;
}

/**
 * Per chunk, what lives there in `dev` (an ext4): one label per chunk, the most telling of its blocks'.
 * `detail` (if given) gets each chunk's files and metadata by name (e.g. `base/5/16398_fsm`, `inode table`).
 */
async function whatLives(dev: string, chunks: number[], detail?: Map<number, string>): Promise<Map<number, string>> {
  const meta = await metadataRanges(dev);
  // mke2fs' "small" type (< 512 MiB) makes 1 KiB blocks: read the block size, do not assume 4 KiB.
  const bs = Number(/Block size:\s+(\d+)/.exec((await execa('dumpe2fs', ['-h', dev], { reject: false })).stdout)?.[1] ?? 4096);
  const per = CHUNK / bs;
  const blocks: number[] = [];
  for (const c of chunks) for (let b = c * per; b < c * per + per; b++) blocks.push(b);
  const inodeOf = new Map<number, number>();
  // debugfs reads a command line of at most a few KiB: 100 blocks per icheck line, one run for all lines.
  const lines: string[] = [];
  for (let i = 0; i < blocks.length; i += 200) lines.push(`icheck ${blocks.slice(i, i + 200).join(' ')}`);
  await writeFile('/tmp/icheck.cmd', lines.join('\n') + '\n');
  const icheck = (await execa('debugfs', ['-f', '/tmp/icheck.cmd', dev], { reject: false })).stdout;
  for (const m of icheck.matchAll(/^(\d+)\s+(\d+)$/gm)) inodeOf.set(Number(m[1]), Number(m[2]));
  const inodes = [...new Set(inodeOf.values())];
  const pathOf = new Map<number, string>();
  const nlines: string[] = [];
  for (let i = 0; i < inodes.length; i += 100) nlines.push(`ncheck ${inodes.slice(i, i + 100).join(' ')}`);
  await writeFile('/tmp/ncheck.cmd', nlines.join('\n') + '\n');
  const ncheck = (await execa('debugfs', ['-f', '/tmp/ncheck.cmd', dev], { reject: false })).stdout;
  for (const m of ncheck.matchAll(/^(\d+)\s+(\S+)$/gm)) pathOf.set(Number(m[1]), m[2]!);
  const label = (b: number): string => {
    const ino = inodeOf.get(b);
    if (ino === 8) return 'ext4 journal';
    if (ino !== undefined) {
      const p = pathOf.get(ino) ?? `inode ${ino}`;
      if (/pg_wal\//.test(p)) return 'WAL segment';
      if (/\/base\//.test(p)) return 'relation file';
      if (/pg_xact|pg_subtrans|pg_multixact|pg_commit_ts/.test(p)) return 'pg_xact & co';
      if (/\/global\//.test(p)) return 'global';
      return `other file ${p.replace(/\/\d+$/, '/N')}`;
    }
    for (const [a, z, k] of meta) if (b >= a && b <= z) return k;
    return 'free / unreferenced';
  };
  const order = ['WAL segment', 'relation file', 'pg_xact & co', 'global', 'ext4 journal', 'inode table', 'block bitmap', 'inode bitmap', 'group descriptors', 'superblock', 'reserved GDT', 'free / unreferenced'];
  const named = (b: number): string => {
    const ino = inodeOf.get(b);
    if (ino === 8) return 'ext4 journal';
    if (ino !== undefined) return (pathOf.get(ino) ?? `inode ${ino}`).replace(/^\/?pg\//, '').replace(/^pg_wal\/.*/, 'pg_wal/SEG');
    for (const [a, z, k] of meta) if (b >= a && b <= z) return k;
    return 'free';
  };
  const res = new Map<number, string>();
  for (const c of chunks) {
    const labels = new Set<string>();
    for (let b = c * per; b < c * per + per; b++) labels.add(label(b));
    if (detail) {
      const names = new Set<string>();
      for (let b = c * per; b < c * per + per; b++) names.add(named(b));
      detail.set(c, [...names].sort().join(' + '));
    }
    res.set(c, order.find((o) => labels.has(o)) ?? [...labels].find((l) => l.startsWith('other file')) ?? [...labels][0]!);
  }
  return res;
}

async function guest(intervals: number, out: string): Promise<void> {
  const { ThinDeltaTracker } = await import('../../agent/cbt/thin-delta/thin-delta-tracker.js');
  const { DmEraTracker } = await import('../../agent/cbt/dm-era/dm-era-tracker.js');
  const { LvmSnapshotProvider } = await import('../../agent/snapshot/lvm/lvm-snapshot-provider.js');
  const { PgQuiescer } = await import('../../agent/pg/pg-quiescer.js');
  const { pino } = await import('pino');
  const log = pino({ level: 'warn' });
  type Side = {
    name: string; tracker: InstanceType<typeof ThinDeltaTracker> | InstanceType<typeof DmEraTracker>;
    provider: InstanceType<typeof LvmSnapshotProvider>; volume: { name: string; device: string; lv?: string; mountpoint: string; chunkSize: number };
    port: number; role: 'primary' | 'standby'; size: number;
    prev: { path: string; snap: unknown; digest: string[]; zero: boolean[] } | null; drained: Set<number>; prevWindow?: Set<number>;
  };
  const sides: Side[] = [
    {
      name: 'thin-delta', tracker: new ThinDeltaTracker({ log }), provider: new LvmSnapshotProvider({ mode: 'thin', agent: 'probe', stateDir: '/tmp/p1', logger: log }),
      volume: { name: 'pgdata', device: '/dev/bsnvg/pgdata', mountpoint: '/srv/pgdata', chunkSize: CHUNK }, port: 5432, role: 'primary', size: 256 << 20, prev: null, drained: new Set(),
    },
    {
      name: 'dm-era', tracker: new DmEraTracker({ log }), provider: new LvmSnapshotProvider({ mode: 'classic', agent: 'probe', stateDir: '/tmp/p2', logger: log, cow: { percent: 60, minBytes: 32 << 20 } }),
      volume: { name: 'stdata', device: '/dev/mapper/stera', lv: 'bsnvg/stdata', mountpoint: '/srv/standby', chunkSize: CHUNK }, port: 5433, role: 'standby', size: 256 << 20, prev: null, drained: new Set(),
    },
  ];
  await execa('mkdir', ['-p', '/tmp/p1', '/tmp/p2']);
  for (const s of sides) {
    await s.tracker.start({ device: s.volume.device, chunkSize: CHUNK, generation: 1 });
    // Which chunks the switch's drain records (the race window: in G and G+1 both).
    const gens = (s.tracker as unknown as { gens: { recordBytes(o: number, l: number): void } }).gens;
    const orig = gens.recordBytes.bind(gens);
    gens.recordBytes = (o: number, l: number) => {
      if (s.tracker.phase === 'switching') for (let c = Math.floor(o / CHUNK); c < Math.ceil((o + l) / CHUNK); c++) s.drained.add(c);
      orig(o, l);
    };
  }
  const sh = async (cmd: string) => (await execa('sh', ['-c', cmd])).stdout;
  const caughtUp = async () => {
    const lsn = await sh(`${PGBIN}/psql -h 127.0.0.1 -p 5432 -U postgres -Atc "select pg_current_wal_lsn()"`);
    for (let i = 0; i < 1000; i++) {
      if ((await sh(`${PGBIN}/psql -h 127.0.0.1 -p 5433 -U postgres -Atc "select pg_last_wal_replay_lsn() >= '${lsn}'"`)) === 't') return;
      await new Promise((r) => setTimeout(r, 300));
    }
    throw new Error('standby did not catch up');
  };
  const report: unknown[] = [];
  for (let k = 0; k <= intervals; k++) {
    if (k > 0) {
      await sh(`${PGBIN}/pgbench -h 127.0.0.1 -U postgres -n -c 2 -t 1000 postgres >/dev/null`);
      await caughtUp();
    }
    for (const s of sides) {
      const q = new PgQuiescer({ connection: { host: '127.0.0.1', port: s.port, user: 'postgres', database: 'postgres' }, role: s.role, logger: log });
      await q.connect();
      await q.quiesce({ label: `probe ${k}`, fast: true });
      s.drained = new Set();
      await s.tracker.prepareSwitch();
      const snap = await s.provider.create(s.volume as never, `probe${k}`);
      const closed = await s.tracker.completeSwitch();
      await q.unquiesce();
      await q.close();
      const cur = await chunkDigests(snap.path, s.size);
      const window = s.drained;
      if (s.prev) {
        const marked: number[] = [];
        for (let c = 0; c < cur.digest.length; c++) if (closed.bitmap.has(c)) marked.push(c);
        const changed = cur.digest.map((d, c) => (d !== s.prev!.digest[c] ? c : -1)).filter((c) => c >= 0);
        const changedSet = new Set(changed);
        const extra = marked.filter((c) => !changedSet.has(c));
        const markedSet = new Set(marked);
        const missed = changed.filter((c) => !markedSet.has(c));
        const detail = new Map<number, string>();
        const where = await whatLives(snap.path, marked, detail);
        const whereChangedUnmarked = await whatLives(snap.path, missed);
        // What the extra chunks held at the previous snapshot → now.
        const wherePrev = await whatLives(s.prev.path, extra);
        const extraPrevToNow: Record<string, number> = {};
        for (const c of extra) {
          const k2 = `${wherePrev.get(c)} -> ${where.get(c)}${cur.zero[c] && s.prev.zero[c] ? ' (zero both)' : ''}`;
          extraPrevToNow[k2] = (extraPrevToNow[k2] ?? 0) + 1;
        }
        const byKind: Record<string, { marked: number; changed: number; extraZero: number; extraSame: number; extraFromWindow: number }> = {};
        for (const c of marked) {
          const w = where.get(c)!;
          const e = (byKind[w] ??= { marked: 0, changed: 0, extraZero: 0, extraSame: 0, extraFromWindow: 0 });
          e.marked++;
          if (changedSet.has(c)) e.changed++;
          else {
            if (cur.zero[c] && s.prev.zero[c]) e.extraZero++;
            else e.extraSame++;
            if (s.prevWindow?.has(c)) e.extraFromWindow++;
          }
        }
        const row = {
          interval: k, tracker: s.name, marked: marked.length, changed: changed.length, extra: extra.length, missed: missed.length,
          ratio: +(marked.length / Math.max(1, changed.length)).toFixed(2),
          extraZeroBoth: extra.filter((c) => cur.zero[c] && s.prev!.zero[c]).length,
          extraInPrevWindow: extra.filter((c) => s.prevWindow?.has(c)).length,
          extraInThisWindow: extra.filter((c) => window.has(c)).length,
          // The extra chunks that are not zero in both snapshots, by what holds them now (file names, metadata).
          extraNonZeroDetail: count(extra.filter((c) => !(cur.zero[c] && s.prev!.zero[c])).map((c) => detail.get(c)!)),
          extraZeroDetail: count(extra.filter((c) => cur.zero[c] && s.prev!.zero[c]).map((c) => detail.get(c)!)),
          prevWindowChunks: s.prevWindow?.size ?? 0,
          byKind, extraPrevToNow, missedKinds: [...whereChangedUnmarked.values()],
          extraSample: extra.slice(0, 40).map((c) => `${c}:${where.get(c)}`),
        };
        report.push(row);
        console.log(JSON.stringify(row));
        await s.provider.remove(s.prev.snap as never);
      }
      s.prev = { path: snap.path, snap, digest: cur.digest, zero: cur.zero };
      s.prevWindow = window;
      console.log(`switch ${k} ${s.name}: window (drain) recorded ${window.size} chunks, closed generation ${closed.bitmap.count()} chunks`);
    }
  }
  for (const s of sides) {
    if (s.prev) await s.provider.remove(s.prev.snap as never);
    await s.tracker.stop();
  }
  await writeFile(out, JSON.stringify(report, null, 1));
}

if (process.argv[2] === 'guest') await guest(Number(process.argv[3]), process.argv[4]!);
else await host();
