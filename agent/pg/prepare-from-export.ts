import { chown, copyFile, readdir, readFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { prepareDataDir, type PrepareResult } from './prepare.js';
import { pgSqlFor } from './sql-table.js';

/**
 * `blocksnap-agent prepare DATADIR --image FILE`: makes the data directory of
 * a mounted exported image startable, from the sidecar the appliance wrote
 * next to FILE (FILE.blocksnap.json: label, LSNs, timeline, version) and the
 * WAL in FILE.wal/ (copied into the data directory's WAL directory, over the
 * shorter copies the snapshot holds of the same segments).
 */
export interface PrepareFromExportOptions {
  asStandby?: boolean;
  primaryConninfo?: string;
  restoreCommand?: string;
}

export async function prepareFromExport(dataDir: string, imageFile: string, o: PrepareFromExportOptions = {}): Promise<PrepareResult & { walCopied: string[]; imageId: string }> {
  let side: any;
  try {
    side = JSON.parse(await readFile(`${imageFile}.blocksnap.json`, 'utf8'));
  } catch (e) {
    throw new BlocksnapError('E_NOT_FOUND', `${imageFile}.blocksnap.json is missing or unreadable: export the image with blocksnap-appliance export (a crash-consistent image has none)`, { cause: e });
  }
  if (side?.format !== 'blocksnap-pg-sidecar' || side.version !== 1 || typeof side.pg !== 'object') {
    throw new BlocksnapError('E_FORMAT', `${imageFile}.blocksnap.json is not a blocksnap PostgreSQL sidecar`);
  }
  const pg = side.pg;
  const walCopied: string[] = [];
  if (pg.walFiles?.length) {
    const st = await stat(dataDir);
    const walDir = join(dataDir, pgSqlFor(pg.serverVersion).walDir);
    const have = new Set(await readdir(`${imageFile}.wal`));
    for (const name of pg.walFiles as string[]) {
      if (!/^[0-9A-F]{24}$/.test(name) || !have.has(name)) throw new BlocksnapError('E_NOT_FOUND', `WAL segment ${name} missing from ${imageFile}.wal`);
      await copyFile(join(`${imageFile}.wal`, name), join(walDir, name));
      await chown(join(walDir, name), st.uid, st.gid);
      walCopied.push(name);
    }
  }
  const r = await prepareDataDir(dataDir, {
    labelFile: pg.labelFile, spcmapFile: pg.spcmapFile || null, stopLsn: pg.stopLsn, timeline: pg.timeline || null,
    version: pg.serverVersion, asStandby: o.asStandby, primaryConninfo: o.primaryConninfo, restoreCommand: o.restoreCommand,
  });
  return { ...r, walCopied, imageId: side.imageId };
}
