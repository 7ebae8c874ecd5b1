import { mkdir, readFile, realpath, rm, rmdir } from 'node:fs/promises';
import path from 'node:path';
import { execa } from 'execa';
import { exportImageTo } from '../../appliance/ops/export-image.js';
import { sidecarPath, walDirPath } from '../../appliance/ops/export-pg.js';
import type { ChunkStore } from '../../appliance/store/chunk-store.js';
import type { PgImageInfo } from '../../appliance/store/pg-image-info.js';
import { BlocksnapError } from '../../proto/errors.js';
import { prepareFromExport } from '../../agent/pg/prepare-from-export.js';
import { attachLoop, detachLoop } from '../../scripts/lab/loop.js';
import { PgCluster } from '../../scripts/lab/pg-cluster.js';

/**
 * Test helper: the restore path a user takes, end to end — export an image
 * and its PostgreSQL sidecar + WAL, attach the file as a loop device, mount
 * it, `prepareFromExport`, start PostgreSQL with the given binaries and wait
 * until it has promoted (recovery over). `release()` undoes exactly what was
 * done, in reverse (stop the server, unmount, detach our loop device by its
 * backing file, remove the files); a failure half-way releases before it
 * throws.
 */
export interface RestoreImageOptions {
  store: ChunkStore;
  imageId: string;
  rootDigest: string;
  pg: PgImageInfo;
  /** Where the export file goes (a reflink-capable pool keeps it cheap). */
  exportDir: string;
  /** Where the export is mounted: `<mountBase>/<name>`. */
  mountBase: string;
  name: string;
  /** The data directory inside the volume's filesystem. */
  dataSubdir: string;
  binDir?: string;
  promoteTimeoutMs?: number;
}

export interface RestoredImage {
  cluster: PgCluster;
  dataDir: string;
  file: string;
  walCopied: string[];
  written: string[];
  /** The server log up to promotion. */
  log(): Promise<string>;
  release(): Promise<void>;
}

const sleep = (ms: number) => new Promise((r) => setTimeout(r, ms));

export async function restoreImage(o: RestoreImageOptions): Promise<RestoredImage> {
  const file = path.join(o.exportDir, `${o.name}.raw`);
  const mnt = path.join(o.mountBase, o.name);
  const undo: Array<() => Promise<unknown>> = [];
  const release = async () => {
    const errors: unknown[] = [];
    for (const u of undo.splice(0).reverse()) await u().catch((e: unknown) => errors.push(e));
    if (errors.length) throw new BlocksnapError('E_DEVICE', `restore ${o.name}: release failed`, { cause: new AggregateError(errors) });
  };
  try {
    undo.push(() => rm(file, { force: true }));
    undo.push(() => rm(sidecarPath(file), { force: true }));
    undo.push(() => rm(walDirPath(file), { recursive: true, force: true }));
    await exportImageTo(o.store, { id: o.imageId, rootDigest: o.rootDigest, pg: o.pg }, file);
    const dev = await attachLoop(file);
    const backing = await realpath(file);
    undo.push(() => detachLoop(dev, { backingFile: backing }));
    await mkdir(mnt, { recursive: true });
    undo.push(() => rmdir(mnt));
    await execa('mount', ['-t', 'ext4', '-o', 'noatime', dev, mnt]);
    undo.push(() => execa('umount', [mnt]));
    const dataDir = path.join(mnt, o.dataSubdir);
    const prep = await prepareFromExport(dataDir, file);
    const cluster = new PgCluster({ dataDir, binDir: o.binDir });
    undo.push(() => cluster.destroy());
    await cluster.start();
    const end = Date.now() + (o.promoteTimeoutMs ?? 60_000);
    while ((await cluster.query<{ r: boolean }>('SELECT pg_is_in_recovery() AS r'))[0]!.r) {
      if (Date.now() > end) throw new BlocksnapError('E_TIMEOUT', `restored ${o.name} is still in recovery after ${o.promoteTimeoutMs ?? 60_000} ms`);
      await sleep(50);
    }
    return {
      cluster, dataDir, file, walCopied: prep.walCopied, written: prep.written,
      log: () => readFile(cluster.logFile!, 'utf8'),
      release,
    };
  } catch (e) {
    await release().catch((err: unknown) => console.error(`restore ${o.name}: cleanup after failure`, err));
    throw e;
  }
}
