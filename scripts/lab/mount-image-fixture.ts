/**
 * Test and benchmark fixture for instant mounts: a real application-consistent
 * PostgreSQL 15 image (volume lab + cluster with a ticker running across the
 * backup + in-process appliance + agent + full backup), served over NBD by the
 * appliance's own NbdServer, the grant a mount manager would hand out, and
 * the WAL source reading the image's WAL pieces from the chunk store.
 *
 * Writable exports: each mount gets its own copy-on-write overlay of the
 * appliance (`newWritableName`). `serveCow` is the other way, kept for
 * comparison: nbdkit's cow filter in front of a read-only export.
 */
import { spawn } from 'node:child_process';
import { mkdtemp, readFile, rm } from 'node:fs/promises';
import { tmpdir } from 'node:os';
import { join } from 'node:path';
import { randomBytes } from 'node:crypto';
import { ImageSource } from '../../appliance/nbd/image-source.js';
import { NbdServer } from '../../appliance/nbd/nbd-server.js';
import { readOnlyExport } from '../../appliance/nbd/read-only-export.js';
import { writableExport } from '../../appliance/nbd/writable-export.js';
import { CowOverlay } from '../../appliance/nbd/cow-overlay.js';
import type { NbdExport } from '../../appliance/nbd/nbd-export.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import type { MountGrant, WalSource } from '../../agent/mount/mount-port.js';
import { isAlive } from '../../proto/shared/proc.js';
import type { E2eFixture } from './e2e-fixture.js';
import { PgTicker, TICK_TABLE_SQL } from './pg-ticker.js';
import { waitFor } from './wait-for.js';
import type { PgCluster } from './pg-cluster.js';
import { freePort } from '../../proto/shared/free-port.js';

export interface PgImage {
  store: ChunkStore;
  imageId: string;
  rootDigest: Buffer;
  pg: PgImageInfo;
  volumeSize: number;
  chunkSize: number;
  /** Ticker ids acknowledged before the backup started: the image holds 1..k, k ≥ this, no gap. */
  ackedBefore: number;
  source: PgCluster;
}

export interface BuildPgImageOptions {
  volumeSize: number;
  poolSize?: number;
  /** pgbench -i scale (0 / undefined: none). */
  pgbenchScale?: number;
  settings?: Record<string, string>;
}

/** Builds one image: call once per file (beforeAll), release with fx.dispose(). */
export async function buildPgImage(fx: E2eFixture, o: BuildPgImageOptions): Promise<PgImage> {
  const lab = await fx.lab({ volumeSize: o.volumeSize, poolSize: o.poolSize ?? Math.max(2 * o.volumeSize, 1024 ** 3), name: 'pgdata' });
  const source = await fx.pg({ dataDir: join(lab.volumeMount, 'pg'), settings: o.settings });
  await source.query(TICK_TABLE_SQL);
  if (o.pgbenchScale) await source.pgbenchInit(o.pgbenchScale);
  const appl = await fx.appliance(['db1']);
  await fx.pgAgent({
    url: appl.url, name: 'db1', token: appl.tokens.db1!, volume: lab.volume, stateDir: join(lab.root, 'agent-state'),
    postgres: { host: '127.0.0.1', port: source.port, user: 'postgres', role: 'primary' },
  });
  const ticker = new PgTicker({ host: '127.0.0.1', port: source.port, user: 'postgres', database: 'postgres' });
  await ticker.start();
  fx.defer('ticker', () => ticker.stop());
  const ackedBefore = await ticker.reach(20);
  const outcome = await appl.app.router.startJob('db1', 'pgdata', 'full').done;
  await ticker.stop();
  if (!outcome.ok) throw new Error(`backup failed: ${JSON.stringify(outcome)}`);
  const img = appl.app.catalog.image(outcome.imageId!)!;
  return {
    store: appl.app.store, imageId: img.id, rootDigest: Buffer.from(img.rootDigest, 'hex'), pg: img.pg as unknown as PgImageInfo,
    volumeSize: img.volumeSize, chunkSize: img.chunkSize, ackedBefore, source,
  };
}

/** The image's WAL segments rebuilt from their pieces in the store (what the appliance's WalFetch answers). */
export function walSourceOf(img: PgImage): WalSource {
  return async (imageId, name) => {
    if (imageId !== img.imageId) throw new Error(`unknown image ${imageId}`);
    const f = img.pg.wal.find((w) => w.name === name);
    if (!f) throw new Error(`image has no WAL ${name}`);
    const buf = Buffer.alloc(f.size);
    for (const p of f.pieces) {
      if (/^0+$/.test(p.digest)) continue;
      (await img.store.get(Buffer.from(p.digest, 'hex'))).copy(buf, p.offset);
    }
    return buf;
  };
}

/**
 * The appliance's NbdServer serving the image under random export names it
 * hands out: `newName()` read-only, `newWritableName()` writable through a
 * copy-on-write overlay of its own (appliance/nbd/cow-overlay.ts, one per
 * name = per mount, as the mount manager gives each mount), created in O(1).
 */
export async function serveImage(fx: E2eFixture, img: PgImage): Promise<{ server: NbdServer; newName(): string; newWritableName(): Promise<string> }> {
  const source = await ImageSource.open(img.store, img.rootDigest);
  const ro: NbdExport = readOnlyExport(source);
  const names = new Map<string, NbdExport>();
  const server = await NbdServer.start({ resolve: async (asked) => names.get(asked) });
  fx.add('nbd server', server, (s) => s.close());
  const overlays = await mkdtemp(join(tmpdir(), 'bsn-overlays-'));
  fx.defer('overlays', () => rm(overlays, { recursive: true, force: true }));
  const name = () => randomBytes(16).toString('hex');
  return {
    server,
    newName: () => {
      const n = name();
      names.set(n, ro);
      return n;
    },
    newWritableName: async () => {
      const n = name();
      // Volatile, as the appliance's mount backend opens them (appliance/mounts/nbd-mount-backend.ts).
      const overlay = await CowOverlay.create(join(overlays, n), { volumeSize: img.volumeSize, chunkSize: img.chunkSize, rootDigest: img.rootDigest }, { volatile: process.env.BENCH_COW_DURABLE !== '1' });
      fx.add(`overlay ${n}`, overlay, (o) => o.close());
      names.set(n, writableExport(source, overlay));
      return n;
    },
  };
}


/** nbdkit's cow filter over `roUri`: a writable export of its own (stopped by PID at dispose). */
export async function serveCow(fx: E2eFixture, roUri: string): Promise<string> {
  const port = await freePort();
  const pidFile = join(tmpdir(), `bsn-cow-${randomBytes(6).toString('hex')}.pid`);
  const child = spawn('nbdkit', ['-f', '-i', '127.0.0.1', '-p', String(port), '-P', pidFile, '--filter=cow', 'nbd', `uri=${roUri}`], {
    detached: true, stdio: 'ignore',
  });
  child.unref();
  const pid = child.pid!;
  fx.defer(`nbdkit cow ${pid}`, async () => {
    try {
      if (await isAlive(pid)) {
        process.kill(pid, 'SIGTERM');
        await waitFor(`nbdkit ${pid} to exit`, async () => !(await isAlive(pid)), { timeoutMs: 20_000 });
      }
    } finally {
      await rm(pidFile, { force: true });
    }
  });
  await waitFor('nbdkit to listen', async () => /^\d+/.test(await readFile(pidFile, 'utf8').catch(() => '')), { timeoutMs: 20_000, everyMs: 10 });
  return `nbd://127.0.0.1:${port}/`;
}

export function grantOf(img: PgImage, uri: string, mountId = `m-${randomBytes(8).toString('hex')}`): MountGrant {
  const { labelFile, spcmapFile, stopLsn, timeline, serverVersion, role } = img.pg;
  return {
    mountId, imageId: img.imageId, writable: true,
    exports: [{
      volume: 'pgdata', imageId: img.imageId, uri, size: img.volumeSize, chunkSize: img.chunkSize,
      pg: { labelFile, spcmapFile, stopLsn, timeline, serverVersion, role, wal: img.pg.wal.map((w) => w.name) },
    }],
  };
}
