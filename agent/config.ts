import { readFileSync } from 'node:fs';
import { z } from 'zod';
import { BlocksnapError } from '../proto/errors.js';
import { isValidChunkSize, MAX_CHUNK_SIZE, MIN_CHUNK_SIZE } from '../proto/shared/volume-geometry.js';
import type { VolumeSpec } from './snapshot/snapshot-provider.js';
import { namesOf, registry, type RegistryNames } from './compose.js';

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
  /** Allow plain ws:// to a non-loopback appliance (cleartext; checkApplianceUrl in proto/ws-transport.ts). */
  insecure: boolean;
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
  /** Snapshot provider, an entry of agent/compose.ts's registry: 'reflink' (default: XFS reflink clones of loop images). */
  provider: string;
  /** Changed-block tracking, a tracker of the registry: 'tracefs' (kernel block tracepoints, default) or 'off' (incrementals compare digests). */
  tracking: string;
  /** What quiesces the database, a quiescer of the registry; absent: 'postgres' if `postgres` is set, else none. */
  quiescer?: string;
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

// The file's schema: strict objects (an unknown key such as "volumez" or postgres.prot is an
// error, not silently ignored), every default in one place. Cross-field rules follow below.
const int = (min: number, max = Number.MAX_SAFE_INTEGER) => {
  const error = max === Number.MAX_SAFE_INTEGER ? `must be an integer ≥ ${min}` : `must be an integer in ${min}..${max}`;
  return z.number({ error }).int({ error }).min(min, { error }).max(max, { error });
};
const absPath = z.string({ error: 'must be an absolute path' }).startsWith('/', { error: 'must be an absolute path' });
const name = z.string({ error: 'must be a name' }).regex(NAME_RE, { error: 'must be a name of letters, digits, . _ - (at most 63)' });
const nonEmpty = z.string({ error: 'must be a non-empty string' }).min(1, { error: 'must be a non-empty string' });

const volumeSchema = z.strictObject({
  name,
  device: absPath,
  image: absPath.optional(),
  lv: z.string({ error: 'must be VG/LV' }).regex(/^[A-Za-z0-9+_.-]+\/[A-Za-z0-9+_.-]+$/, { error: 'must be VG/LV' }).optional(),
  mountpoint: absPath,
  chunkSize: int(MIN_CHUNK_SIZE, MAX_CHUNK_SIZE).refine(isValidChunkSize, { error: `must be a power of two from ${MIN_CHUNK_SIZE} to ${MAX_CHUNK_SIZE}` }).default(65536),
});

const postgresSchema = z.strictObject({
  host: nonEmpty.default('127.0.0.1'),
  port: int(1, 65535).default(5432),
  user: nonEmpty.default('postgres'),
  password: nonEmpty.optional(),
  database: nonEmpty.default('postgres'),
  role: z.enum(['primary', 'standby', 'auto'], { error: 'must be primary, standby or auto' }).default('auto'),
  fast: z.boolean({ error: 'must be true or false' }).default(true),
  dataDirectory: absPath.optional(),
  pauseTimeoutMs: int(100, 3_600_000).default(30_000),
  watchdogSeconds: int(5, 86_400).default(600),
}, { error: 'must be an object' });

const configSchema = z.strictObject({
  appliance: z.string({ error: 'must be a ws:// or wss:// URL' }).regex(/^wss?:\/\//, { error: 'must be a ws:// or wss:// URL' }),
  agent: name,
  token: nonEmpty.optional(),
  tokenFile: nonEmpty.optional(),
  caFile: absPath.optional(),
  insecure: z.boolean({ error: 'must be true or false' }).default(false),
  stateDir: absPath,
  volumes: z.array(volumeSchema, { error: 'must be an array of volumes' }),
  groups: z.array(z.strictObject({
    name,
    volumes: z.array(z.string(), { error: 'must list 1..64 volumes' }).min(1, { error: 'must list 1..64 volumes' }).max(64, { error: 'must list 1..64 volumes' }),
  }), { error: '"groups" must be an array' }).default([]),
  windowBytes: int(1 << 20).default(32 << 20),
  batchBytes: int(64 << 10).default(2 << 20),
  workers: int(1).default(2),
  compressionLevel: int(-7, 22).default(1),
  reconnectMaxMs: int(100).default(10_000),
  // Names of the composition registry (agent/compose.ts), checked below against the registry given.
  provider: name.default('reflink'),
  tracking: name.default('tracefs'),
  quiescer: name.optional(),
  trackerBufferKb: int(1).optional(),
  postgres: postgresSchema.optional(),
  retainSnapshotsDir: absPath.optional(),
}, { error: 'not a JSON object' });

export function loadAgentConfig(file: string, known: RegistryNames = namesOf(registry)): AgentConfig {
  let raw: unknown;
  try {
    raw = JSON.parse(readFileSync(file, 'utf8'));
  } catch (e) {
    throw new BlocksnapError('E_CONFIG', `cannot read agent config ${file}: ${(e as Error).message}`, { cause: e });
  }
  return parseAgentConfig(raw, file, known);
}

/** `a.b[2].c` */
function pathOf(path: readonly PropertyKey[]): string {
  return path.map((k, i) => (typeof k === 'number' ? `[${k}]` : `${i ? '.' : ''}${String(k)}`)).join('');
}

/** Every problem of the file, one per line, each named by its path (`postgres.prot: unrecognized key`). */
function issuesOf(error: z.ZodError): string[] {
  return error.issues.flatMap((i) => {
    if (i.code === 'unrecognized_keys') return i.keys.map((k) => `${pathOf([...i.path, k])}: unrecognized key`);
    return [i.path.length ? `${pathOf(i.path)}: ${i.message}` : i.message];
  });
}

/** `known`: the names the composition registry has (tests pass a registry with their fakes). */
export function parseAgentConfig(raw: unknown, source = 'config', known: RegistryNames = namesOf(registry)): AgentConfig {
  const bad = (problems: string[]) => new BlocksnapError('E_CONFIG', problems.map((m) => `${source}: ${m}`).join('\n'));
  const parsed = configSchema.safeParse(raw);
  if (!parsed.success) throw bad(issuesOf(parsed.error));
  const c = parsed.data;
  const problems: string[] = [];
  const names = new Set<string>();
  c.volumes.forEach((v, i) => {
    if (names.has(v.name)) problems.push(`volumes[${i}].name: volume ${v.name} is listed twice`);
    names.add(v.name);
  });
  problems.push(...groupProblems(c.groups, names));
  const oneOf = (key: string, value: string | undefined, allowed: string[]) => {
    if (value === undefined || allowed.includes(value)) return;
    const quoted = allowed.map((a) => JSON.stringify(a));
    problems.push(`${key}: must be ${quoted.length > 1 ? `${quoted.slice(0, -1).join(', ')} or ${quoted.at(-1)}` : quoted[0] ?? 'registered'}`);
  };
  oneOf('provider', c.provider, known.providers);
  oneOf('tracking', c.tracking, known.trackers);
  oneOf('quiescer', c.quiescer, known.quiescers);
  if (c.quiescer === 'postgres' && !c.postgres) problems.push('quiescer: "postgres" needs the "postgres" section');
  if (c.token === undefined && c.tokenFile === undefined) problems.push('"token" or "tokenFile" is required');
  if (problems.length) throw bad(problems);
  let token = c.token;
  if (token === undefined) {
    try {
      token = readFileSync(c.tokenFile!, 'utf8').trim();
    } catch (e) {
      throw new BlocksnapError('E_CONFIG', `${source}: tokenFile: cannot read tokenFile ${c.tokenFile}: ${(e as Error).message}`, { cause: e });
    }
    if (!token) throw bad([`tokenFile: ${c.tokenFile} is empty`]);
  }
  let ca: Buffer | undefined;
  if (c.caFile !== undefined) {
    try {
      ca = readFileSync(c.caFile);
    } catch (e) {
      throw new BlocksnapError('E_CONFIG', `${source}: caFile: cannot read caFile ${c.caFile}: ${(e as Error).message}`, { cause: e });
    }
  }
  const volumes: VolumeSpec[] = c.volumes.map((v) => ({ name: v.name, device: v.device, image: v.image, ...(v.lv ? { lv: v.lv } : {}), mountpoint: v.mountpoint, chunkSize: v.chunkSize }));
  const pg = c.postgres;
  return {
    appliance: c.appliance, insecure: c.insecure, agent: c.agent, token, stateDir: c.stateDir, volumes,
    ...(ca ? { ca } : {}), groups: c.groups.map((g) => ({ name: g.name, volumes: [...g.volumes] })),
    windowBytes: c.windowBytes, batchBytes: c.batchBytes, workers: c.workers, compressionLevel: c.compressionLevel,
    reconnectMaxMs: c.reconnectMaxMs, retainSnapshotsDir: c.retainSnapshotsDir, provider: c.provider, tracking: c.tracking,
    ...(c.quiescer === undefined ? {} : { quiescer: c.quiescer }),
    ...(pg === undefined ? {} : {
      postgres: {
        host: pg.host, port: pg.port, user: pg.user, ...(pg.password === undefined ? {} : { password: pg.password }),
        database: pg.database, role: pg.role, fast: pg.fast, ...(pg.dataDirectory ? { dataDirectory: pg.dataDirectory } : {}),
        pauseTimeoutMs: pg.pauseTimeoutMs, watchdogSeconds: pg.watchdogSeconds,
      },
    }),
    ...(c.trackerBufferKb === undefined ? {} : { trackerBufferKb: c.trackerBufferKb }),
  };
}

/** Consistency-group rules (DESIGN.md §4.4) the schema cannot say: membership and names. */
function groupProblems(groups: { name: string; volumes: string[] }[], volumes: Set<string>): string[] {
  const problems: string[] = [];
  const member = new Map<string, string>();
  const names = new Set<string>();
  groups.forEach((g, i) => {
    if (volumes.has(g.name)) problems.push(`groups[${i}].name: group ${g.name} has the name of a volume: jobs name either, so the names must differ`);
    if (names.has(g.name)) problems.push(`groups[${i}].name: group ${g.name} is listed twice`);
    names.add(g.name);
    g.volumes.forEach((m, j) => {
      if (!volumes.has(m)) return void problems.push(`groups[${i}].volumes[${j}]: group ${g.name}: ${JSON.stringify(m)} is not a configured volume`);
      const other = member.get(m);
      if (other) problems.push(`groups[${i}].volumes[${j}]: volume ${m} is in groups ${other} and ${g.name}: a volume is in at most one group`);
      member.set(m, g.name);
    });
  });
  return problems;
}
