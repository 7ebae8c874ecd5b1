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
import { writeFileDurably } from '../../proto/shared/durable-file.js';

export const VOLUME_REGISTRY_FORMAT = 'blocksnap-reflink-volumes';

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

