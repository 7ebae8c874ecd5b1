import { readFileSync } from 'node:fs';
import { BlocksnapError } from '../proto/errors.js';
import type { VolumeSpec } from './snapshot/snapshot-provider.js';

/**
 * Agent configuration file (JSON). Example:
 *   { "appliance": "ws://10.0.0.5:7700/v1/agent", "agent": "db1",
 *     "tokenFile": "/etc/blocksnap/token", "stateDir": "/var/lib/blocksnap",
 *     "volumes": [{ "name": "pgdata", "device": "/dev/loop3",
 *                   "image": "/pool/pgdata.img", "mountpoint": "/srv/pg",
 *                   "chunkSize": 65536 }] }
 */
export interface AgentConfig {
  appliance: string;
  /** PEM CA bundle that must sign the appliance's certificate (wss://); default: the system roots. */
  ca?: Buffer;
  agent: string;
  token: string;
  stateDir: string;
  volumes: VolumeSpec[];
  /**
   * Consistency groups (DESIGN.md §4.4): each is snapshotted at one instant
   * and committed as one image set. A volume is in at most one group; a
   * group name may not be a volume name (jobs name either).
   */
  groups: VolumeGroup[];
  /** Unacknowledged batch bytes in flight (flow control). */
  windowBytes: number;
  /** Target payload bytes per ChunkBatch frame. */
  batchBytes: number;
  workers: number;
  /** zstd level for chunk data (-7..22; negative = zstd's fast levels). */
  compressionLevel: number;
  reconnectMaxMs: number;
  /** Changed-block tracking: 'tracefs' (kernel block tracepoints) or 'off' (incrementals compare digests). */
  tracking: 'tracefs' | 'off';
  /** Per-CPU ring buffer of each tracing instance, KiB (default: the tracker's). Tests shrink it to force lost events. */
  trackerBufferKb?: number;
  /** The PostgreSQL server whose data lives on the volumes: quiesced around every snapshot. Absent = crash-consistent images. */
  postgres?: PostgresConfig;
  /** Keep a reflink clone of every snapshot here before removing it (audits, demo, tests). */
  retainSnapshotsDir?: string;
}

export interface VolumeGroup {
  name: string;
  volumes: string[];
}

export interface PostgresConfig {
  host: string;
  port: number;
  user: string;
  password?: string;
  database: string;
  /** What the server must be; a server that is not is an error (E_PG), nothing is held. */
  role: 'primary' | 'standby' | 'auto';
  /** Immediate checkpoint at backup start (default true). */
  fast: boolean;
  /** The data directory as this host sees it (to read WAL after the stop); default: asked from the server. */
  dataDirectory?: string;
  /** Limits: replay pause, and the watchdog that releases everything if a job hangs. */
  pauseTimeoutMs: number;
  watchdogSeconds: number;
}

const NAME_RE = /^[A-Za-z0-9][A-Za-z0-9._-]{0,62}$/;

export function loadAgentConfig(file: string): AgentConfig {
  let raw: any;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new BlocksnapError('E_CONFIG', `cannot read agent config ${file}: ${(e as Error).message}`, { cause: e });
  }
  return parseAgentConfig(raw, file);
}

export function parseAgentConfig(raw: any, source = 'config'): AgentConfig {
  const bad = (m: string) => new BlocksnapError('E_CONFIG', `${source}: ${m}`);
  if (typeof raw !== 'object' || raw === null) throw bad('not a JSON object');
  if (typeof raw.appliance !== 'string' || !/^wss?:\/\//.test(raw.appliance)) throw bad('"appliance" must be a ws:// or wss:// URL');
  if (typeof raw.agent !== 'string' || !NAME_RE.test(raw.agent)) throw bad('"agent" must be a name of letters, digits, . _ -');
  let token = raw.token;
  if (token === undefined && typeof raw.tokenFile === 'string') {
    try {
      token = readFileSync(raw.tokenFile, 'utf8').trim();
    } catch (e) {
      throw new BlocksnapError('E_CONFIG', `${source}: cannot read tokenFile ${raw.tokenFile}`, { cause: e });
    }
  }
  if (typeof token !== 'string' || token.length === 0) throw bad('"token" or "tokenFile" is required');
  if (typeof raw.stateDir !== 'string' || !raw.stateDir.startsWith('/')) throw bad('"stateDir" must be an absolute path');
  if (!Array.isArray(raw.volumes)) throw bad('"volumes" must be an array');
  const names = new Set<string>();
  const volumes: VolumeSpec[] = raw.volumes.map((v: any, i: number) => {
    if (typeof v?.name !== 'string' || !NAME_RE.test(v.name)) throw bad(`volumes[${i}].name is invalid`);
    if (names.has(v.name)) throw bad(`volume ${v.name} is listed twice`);
    names.add(v.name);
    for (const k of ['device', 'mountpoint'] as const) {
      if (typeof v[k] !== 'string' || !v[k].startsWith('/')) throw bad(`volumes[${i}].${k} must be an absolute path`);
    }
    if (v.image !== undefined && (typeof v.image !== 'string' || !v.image.startsWith('/'))) throw bad(`volumes[${i}].image must be an absolute path`);
    const cs = v.chunkSize ?? 65536;
    if (!Number.isInteger(cs) || cs < 4096 || cs > 4 << 20 || (cs & (cs - 1)) !== 0) {
      throw bad(`volumes[${i}].chunkSize must be a power of two from 4096 to 4194304`);
    }
    return { name: v.name, device: v.device, image: v.image, mountpoint: v.mountpoint, chunkSize: cs };
  });
  const groups = groupsOf(raw.groups, names, bad);
  const num = (k: string, d: number, min: number) => {
    const x = raw[k] ?? d;
    if (!Number.isInteger(x) || x < min) throw bad(`"${k}" must be an integer ≥ ${min}`);
    return x;
  };
  return {
    appliance: raw.appliance, agent: raw.agent, token, stateDir: raw.stateDir, volumes,
    ...(raw.caFile === undefined ? {} : { ca: readCa(raw.caFile, bad) }), groups,
    windowBytes: num('windowBytes', 32 << 20, 1 << 20),
    batchBytes: num('batchBytes', 2 << 20, 64 << 10),
    workers: num('workers', 2, 1),
    compressionLevel: level(raw.compressionLevel, bad),
    reconnectMaxMs: num('reconnectMaxMs', 10_000, 100),
    retainSnapshotsDir: optionalAbs(raw.retainSnapshotsDir, 'retainSnapshotsDir', bad),
    tracking: trackingOf(raw.tracking, bad),
    ...(raw.postgres === undefined ? {} : { postgres: postgresOf(raw.postgres, bad) }),
    ...(raw.trackerBufferKb === undefined ? {} : { trackerBufferKb: num('trackerBufferKb', 0, 1) }),
  };
}

function groupsOf(v: unknown, volumes: Set<string>, bad: (m: string) => BlocksnapError): VolumeGroup[] {
  if (v === undefined) return [];
  if (!Array.isArray(v)) throw bad('"groups" must be an array');
  const member = new Map<string, string>();
  const names = new Set<string>();
  return v.map((g: any, i: number) => {
    if (typeof g?.name !== 'string' || !NAME_RE.test(g.name)) throw bad(`groups[${i}].name is invalid`);
    if (volumes.has(g.name)) throw bad(`group ${g.name} has the name of a volume: jobs name either, so the names must differ`);
    if (names.has(g.name)) throw bad(`group ${g.name} is listed twice`);
    names.add(g.name);
    if (!Array.isArray(g.volumes) || g.volumes.length === 0 || g.volumes.length > 64) throw bad(`groups[${i}].volumes must list 1..64 volumes`);
    for (const m of g.volumes) {
      if (typeof m !== 'string' || !volumes.has(m)) throw bad(`group ${g.name}: ${JSON.stringify(m)} is not a configured volume`);
      const other = member.get(m);
      if (other) throw bad(`volume ${m} is in groups ${other} and ${g.name}: a volume is in at most one group`);
      member.set(m, g.name);
    }
    return { name: g.name, volumes: [...g.volumes] };
  });
}

function optionalAbs(v: unknown, key: string, bad: (m: string) => BlocksnapError): string | undefined {
  if (v === undefined) return undefined;
  if (typeof v !== 'string' || !v.startsWith('/')) throw bad(`"${key}" must be an absolute path`);
  return v;
}

function trackingOf(v: unknown, bad: (m: string) => BlocksnapError): 'tracefs' | 'off' {
  if (v === undefined) return 'tracefs';
  if (v !== 'tracefs' && v !== 'off') throw bad('"tracking" must be "tracefs" or "off"');
  return v;
}

function postgresOf(v: any, bad: (m: string) => BlocksnapError): PostgresConfig {
  if (typeof v !== 'object' || v === null) throw bad('"postgres" must be an object');
  const str = (k: string, d?: string) => {
    const x = v[k] ?? d;
    if (typeof x !== 'string' || x === '') throw bad(`"postgres.${k}" must be a non-empty string`);
    return x;
  };
  const int = (k: string, d: number, min: number, max: number) => {
    const x = v[k] ?? d;
    if (!Number.isInteger(x) || x < min || x > max) throw bad(`"postgres.${k}" must be an integer in ${min}..${max}`);
    return x;
  };
  const role = v.role ?? 'auto';
  if (!['primary', 'standby', 'auto'].includes(role)) throw bad('"postgres.role" must be primary, standby or auto');
  if (v.dataDirectory !== undefined && (typeof v.dataDirectory !== 'string' || !v.dataDirectory.startsWith('/'))) {
    throw bad('"postgres.dataDirectory" must be an absolute path');
  }
  return {
    host: str('host', '127.0.0.1'), port: int('port', 5432, 1, 65535), user: str('user', 'postgres'),
    ...(v.password === undefined ? {} : { password: str('password') }),
    database: str('database', 'postgres'), role, fast: v.fast === undefined ? true : !!v.fast,
    ...(v.dataDirectory ? { dataDirectory: v.dataDirectory } : {}),
    pauseTimeoutMs: int('pauseTimeoutMs', 30_000, 100, 3_600_000), watchdogSeconds: int('watchdogSeconds', 600, 5, 86_400),
  };
}

function level(v: unknown, bad: (m: string) => BlocksnapError): number {
  if (v === undefined) return 1;
  if (!Number.isInteger(v) || (v as number) < -7 || (v as number) > 22) throw bad('"compressionLevel" must be an integer in -7..22');
  return v as number;
}

function readCa(file: unknown, bad: (m: string) => BlocksnapError): Buffer {
  if (typeof file !== 'string' || !file.startsWith('/')) throw bad('"caFile" must be an absolute path');
  try {
    return readFileSync(file);
  } catch (e) {
    throw new BlocksnapError('E_CONFIG', `cannot read caFile ${file}: ${(e as Error).message}`, { cause: e });
  }
}
