import { chown, copyFile, stat } from 'node:fs/promises';
import { join } from 'node:path';
import { checkDataDir, prepareDataDir, type PrepareOptions, type PrepareResult } from './prepare.js';
import { checkSidecarAgainstData } from './sidecar-check.js';
import { pgSqlFor } from './sql-table.js';

/**
 * `blocksnap-agent prepare DATADIR --image FILE`: makes the data directory of
 * a mounted exported image startable, from the sidecar the appliance wrote
 * next to FILE (FILE.blocksnap.json: label, LSNs, timeline, version) and the
 * WAL in FILE.wal/ (copied into the data directory's WAL directory, over the
 * shorter copies the snapshot holds of the same segments).
 *
 * Nothing is written before every check has passed: the sidecar belongs to
 * FILE and FILE is the data under DATADIR (sidecar-check.ts), the WAL is the
 * image's, and prepareDataDir's own refusals (version, label, live postmaster).
 */
export interface PrepareFromExportOptions {
  asStandby?: boolean;
  primaryConninfo?: string;
  restoreCommand?: string;
  port?: number;
}

export async function prepareFromExport(dataDir: string, imageFile: string, o: PrepareFromExportOptions = {}): Promise<PrepareResult & { walCopied: string[]; imageId: string }> {
  const { sidecar, walFiles } = await checkSidecarAgainstData(dataDir, imageFile);
  const pg = sidecar.pg;
  const opts: PrepareOptions = {
    labelFile: pg.labelFile, spcmapFile: pg.spcmapFile || null, stopLsn: pg.stopLsn, timeline: pg.timeline || null,
    version: pg.serverVersion, asStandby: o.asStandby, primaryConninfo: o.primaryConninfo, restoreCommand: o.restoreCommand, port: o.port,
  };
  await checkDataDir(dataDir, opts);
  const walCopied: string[] = [];
  if (walFiles.length) {
    const st = await stat(dataDir);
    const walDir = join(dataDir, pgSqlFor(pg.serverVersion).walDir);
    for (const w of walFiles) {
      await copyFile(w.path, join(walDir, w.name));
      await chown(join(walDir, w.name), st.uid, st.gid);
      walCopied.push(w.name);
    }
  }
  const r = await prepareDataDir(dataDir, opts);
  return { ...r, walCopied, imageId: sidecar.imageId };
}
