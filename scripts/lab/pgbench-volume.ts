import { join } from 'node:path';
import { PgCluster } from './pg-cluster.js';
import { createVolumeLab, type VolumeLab } from './volume-lab.js';

/**
 * The volume the full backup's ≥ 500 MB/s was measured on (bench.ts part A,
 * README "End to end"): pgbench at `scale` (50 there: 1.47 GB allocated,
 * ~17× compressible with zstd level 1) on a 4 GiB file-backed ext4 volume
 * named `pgdata`, PostgreSQL 15 running, a CHECKPOINT after the load. Shared
 * by bench.ts and bench-restore.ts so both measure the same data.
 */
export interface PgbenchVolume {
  lab: VolumeLab;
  pg: PgCluster;
  /** Stops PostgreSQL and releases the lab (safe after a partial set-up). */
  destroy(): Promise<void>;
}

export const PGBENCH_VOLUME_SIZE = 4 * 1024 ** 3;

export async function createPgbenchVolume(scale: number, say: (m: string) => void = () => undefined): Promise<PgbenchVolume> {
  const lab = await createVolumeLab({ volumeSize: PGBENCH_VOLUME_SIZE, poolSize: 16 * 1024 ** 3, name: 'pgdata' });
  const pg = new PgCluster({ dataDir: join(lab.volumeMount, 'pg'), settings: { max_wal_size: '2GB' } });
  const destroy = async () => {
    await pg.destroy().catch(() => undefined);
    await lab.destroy();
  };
  try {
    await pg.initdb();
    await pg.start();
    say(`pgbench -i -s ${scale} on a 4 GiB volume`);
    await pg.pgbenchInit(scale);
    await pg.query('checkpoint');
  } catch (e) {
    await destroy().catch(() => undefined);
    throw e;
  }
  return { lab, pg, destroy };
}
