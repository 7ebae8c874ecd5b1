/**
 * Files the reflink snapshot provider keeps in the agent's state directory.
 *
 * Freeze marker, `STATE/freeze-<volume>.json`, written durably *before*
 * `fsfreeze -f` and removed after a successful thaw, so a process killed
 * inside the freeze window leaves a record the next start uses to thaw:
 *
 *   { "format": "blocksnap-freeze-marker", "version": 1,
 *     "volume": "pgdata",                 // volume name
 *     "mountpoint": "/srv/pgdata",        // what was frozen (required)
 *     "device": "/dev/loop3",             // informational
 *     "snapshotTemp": "/pool/.blocksnap/.pgdata@t1.snap.tmp" | null,
 *     "pid": 1234, "createdAt": "ISO-8601" }
 *
 * Volume registry, `STATE/reflink-volumes.json`: every snapshot directory
 * this provider ever wrote into, so stale snapshots are found from the state
 * directory alone (agent start, the cleanup command):
 *
 *   { "format": "blocksnap-reflink-volumes", "version": 1,
 *     "volumes": { "pgdata": "/pool/.blocksnap" } }
 *
 * Both are written temp + fsync + rename + directory fsync.
 */
import { mkdir, readFile, readdir, rm } from 'node:fs/promises';
import path from 'node:path';
import { BlocksnapError } from '../../proto/errors.js';
import { fsyncDir, writeFileDurably } from '../../proto/shared/durable-file.js';

export const FREEZE_MARKER_FORMAT = 'blocksnap-freeze-marker';
export const VOLUME_REGISTRY_FORMAT = 'blocksnap-reflink-volumes';

export interface FreezeMarker {
  format: typeof FREEZE_MARKER_FORMAT;
  version: 1;
  volume: string;
  mountpoint: string;
  device?: string;
  snapshotTemp?: string | null;
  pid?: number;
  createdAt?: string;
}

export function freezeMarkerPath(stateDir: string, volume: string): string {
  return path.join(stateDir, `freeze-${volume}.json`);
}

export async function writeFreezeMarker(stateDir: string, marker: Omit<FreezeMarker, 'format' | 'version'>): Promise<string> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const file = freezeMarkerPath(stateDir, marker.volume);
  const full: FreezeMarker = { format: FREEZE_MARKER_FORMAT, version: 1, ...marker };
  await writeFileDurably(file, JSON.stringify(full, null, 2) + '\n');
  return file;
}

export async function removeStateFile(file: string): Promise<void> {
  await rm(file, { force: true });
  await fsyncDir(path.dirname(file)).catch(() => undefined);
}

/** Every freeze marker in `stateDir` with the file it came from; unreadable ones are E_FORMAT errors. */
export async function readFreezeMarkers(stateDir: string): Promise<Array<{ file: string; marker: FreezeMarker }>> {
  let names: string[];
  try {
    names = await readdir(stateDir);
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return [];
    throw new BlocksnapError('E_SNAPSHOT', `cannot read state directory ${stateDir}`, { cause: e });
  }
  const out: Array<{ file: string; marker: FreezeMarker }> = [];
  for (const name of names.filter((n) => /^freeze-.+\.json$/.test(n)).sort()) {
    const file = path.join(stateDir, name);
    let m: Partial<FreezeMarker>;
    try {
      m = JSON.parse(await readFile(file, 'utf8')) as Partial<FreezeMarker>;
    } catch (e) {
      throw new BlocksnapError('E_FORMAT', `unreadable freeze marker ${file}`, { cause: e });
    }
    if (m.format !== FREEZE_MARKER_FORMAT || m.version !== 1 || typeof m.mountpoint !== 'string' || typeof m.volume !== 'string') {
      throw new BlocksnapError('E_FORMAT', `${file} is not a version 1 freeze marker`);
    }
    out.push({ file, marker: m as FreezeMarker });
  }
  return out;
}


function registryPath(stateDir: string): string {
  return path.join(stateDir, 'reflink-volumes.json');
}

export async function readVolumeRegistry(stateDir: string): Promise<Map<string, string>> {
  let text: string;
  try {
    text = await readFile(registryPath(stateDir), 'utf8');
  } catch (e) {
    if ((e as NodeJS.ErrnoException).code === 'ENOENT') return new Map();
    throw new BlocksnapError('E_SNAPSHOT', `cannot read ${registryPath(stateDir)}`, { cause: e });
  }
  let parsed: { format?: string; version?: number; volumes?: Record<string, string> };
  try {
    parsed = JSON.parse(text) as typeof parsed;
  } catch (e) {
    throw new BlocksnapError('E_FORMAT', `unreadable volume registry ${registryPath(stateDir)}`, { cause: e });
  }
  if (parsed.format !== VOLUME_REGISTRY_FORMAT || parsed.version !== 1 || typeof parsed.volumes !== 'object') {
    throw new BlocksnapError('E_FORMAT', `${registryPath(stateDir)} is not a version 1 volume registry`);
  }
  return new Map(Object.entries(parsed.volumes));
}

export async function writeVolumeRegistry(stateDir: string, volumes: Map<string, string>): Promise<void> {
  await mkdir(stateDir, { recursive: true, mode: 0o700 });
  const body = { format: VOLUME_REGISTRY_FORMAT, version: 1, volumes: Object.fromEntries([...volumes].sort()) };
  await writeFileDurably(registryPath(stateDir), JSON.stringify(body, null, 2) + '\n');
}

export { fsyncDir };
