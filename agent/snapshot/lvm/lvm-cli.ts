/**
 * The LVM commands the LVM providers and trackers run, through execa, with
 * reports read as JSON (`--reportformat json`, sizes in bytes). A failing
 * command becomes a BlocksnapError whose message carries LVM's own words
 * ("Volume group "x" not found", "Insufficient free space"), because that is
 * what a user needs to fix the configuration.
 */
import { execa } from 'execa';
import { BlocksnapError, type ErrorCode } from '../../../proto/errors.js';

export interface LvInfo {
  vg: string;
  name: string;
  /** lv_attr, e.g. "Vwi-a-tz--" (thin), "swi-a-s---" (classic snapshot; [4] = 'I' when invalid). */
  attr: string;
  size: number;
  segtype: string;
  origin: string;
  pool: string;
  tags: string[];
  /** Kernel device numbers of an active LV (-1 when inactive). */
  major: number;
  minor: number;
  /** CoW / thin data fill, percent; NaN when it does not apply. */
  dataPercent: number;
  /** dm name (vg-lv with '-' doubled) and thin device id (thin LVs), '' otherwise. */
  dmPath: string;
  thinId: number;
  time: string;
}

const LV_FIELDS = 'vg_name,lv_name,lv_attr,lv_size,segtype,origin,pool_lv,lv_tags,lv_kernel_major,lv_kernel_minor,data_percent,lv_dm_path,thin_id,lv_time';

export class LvmCommandError extends BlocksnapError {
  constructor(code: ErrorCode, readonly command: string, readonly stderr: string, options?: { cause?: unknown }) {
    super(code, `${command}: ${stderr.trim().split('\n').map((l) => l.trim()).filter(Boolean).join('; ') || 'failed'}`, options);
  }
}

export interface LvmRunOptions {
  code?: ErrorCode;
  timeoutMs?: number;
}

/**
 * How a command past its deadline is stopped: SIGINT, the one signal LVM
 * honours only where stopping is safe (waiting for a lock, between steps),
 * and never SIGKILL. An LVM command killed between suspending a device and
 * resuming it leaves that device suspended, and every write to the
 * filesystem on it (the database) hangs until someone resumes it by hand:
 * a command that does not stop on SIGINT is waited for instead. dmsetup and
 * the thin-provisioning tools stop on SIGINT; the kernel finishes an ioctl
 * already started either way.
 */
const STOP = { killSignal: 'SIGINT', forceKillAfterDelay: false } as const;

/** Runs an LVM (or dmsetup / thin-provisioning-tools) command; stdout, or LvmCommandError. */
export async function lvm(cmd: string, args: string[], opts: LvmRunOptions = {}): Promise<string> {
  const r = await execa(cmd, args, { reject: false, stdin: 'ignore', timeout: opts.timeoutMs ?? 120_000, ...STOP, env: { LVM_SUPPRESS_FD_WARNINGS: '1' } });
  if (r.exitCode !== 0 || r.failed) {
    const said = String(r.stderr || r.stdout || r.shortMessage);
    const detail = r.timedOut ? `${said}\n(ran past its ${opts.timeoutMs ?? 120_000} ms deadline: interrupted with SIGINT)` : said;
    throw new LvmCommandError(opts.code ?? 'E_SNAPSHOT', [cmd, ...args].join(' '), detail, { cause: r });
  }
  return String(r.stdout);
}

const num = (s: string | undefined): number => (s === undefined || s === '' ? NaN : Number(s));

function parseLvs(stdout: string): LvInfo[] {
  const doc = JSON.parse(stdout) as { report: Array<{ lv?: Array<Record<string, string>> }> };
  return (doc.report[0]?.lv ?? []).map((r) => ({
    vg: r.vg_name!, name: r.lv_name!, attr: r.lv_attr ?? '', size: num(r.lv_size), segtype: r.segtype ?? '',
    origin: r.origin ?? '', pool: r.pool_lv ?? '', tags: (r.lv_tags ?? '').split(',').filter(Boolean),
    major: num(r.lv_kernel_major), minor: num(r.lv_kernel_minor), dataPercent: num(r.data_percent),
    dmPath: r.lv_dm_path ?? '', thinId: num(r.thin_id), time: r.lv_time ?? '',
  }));
}

/** `lvs` of the given selectors (VG, VG/LV, or @tag); every LV when none. */
export async function listLvs(selectors: string[] = [], opts: LvmRunOptions = {}): Promise<LvInfo[]> {
  const out = await lvm('lvs', ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-a', '-o', LV_FIELDS, ...selectors], opts);
  return parseLvs(out);
}

/** One LV; E_SNAPSHOT naming what is missing (the VG or the LV). */
export async function lvInfo(vgLv: string, code: ErrorCode = 'E_SNAPSHOT'): Promise<LvInfo> {
  await vgInfo(vgLv.split('/')[0]!, code); // "VG missing" is its own error, not "LV not found"
  const r = await execa('lvs', ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', LV_FIELDS, vgLv], { reject: false, stdin: 'ignore', timeout: 60_000, ...STOP });
  if (r.exitCode !== 0) throw new LvmCommandError(code, `lvs ${vgLv}`, `logical volume ${vgLv} not found (${String(r.stderr).trim()})`);
  const lv = parseLvs(String(r.stdout))[0];
  if (!lv) throw new BlocksnapError(code, `logical volume ${vgLv} not found`);
  return lv;
}

export interface VgInfo {
  name: string;
  size: number;
  free: number;
  extentSize: number;
}

export async function vgInfo(vg: string, code: ErrorCode = 'E_SNAPSHOT'): Promise<VgInfo> {
  const r = await execa('vgs', ['--reportformat', 'json', '--units', 'b', '--nosuffix', '-o', 'vg_name,vg_size,vg_free,vg_extent_size', vg], {
    reject: false, stdin: 'ignore', timeout: 60_000, ...STOP,
  });
  if (r.exitCode !== 0) throw new LvmCommandError(code, `vgs ${vg}`, `volume group ${vg} not found (${String(r.stderr).trim()})`);
  const row = (JSON.parse(String(r.stdout)) as { report: Array<{ vg?: Array<Record<string, string>> }> }).report[0]?.vg?.[0];
  if (!row) throw new BlocksnapError(code, `volume group ${vg} not found`);
  return { name: row.vg_name!, size: num(row.vg_size), free: num(row.vg_free), extentSize: num(row.vg_extent_size) };
}

/** A classic snapshot the kernel has invalidated (its CoW area overflowed): lv_attr state 'I'. */
export function isInvalidSnapshot(lv: LvInfo): boolean {
  return lv.attr[4] === 'I';
}

/** LVM tag characters are [A-Za-z0-9_+.-/=!:&#]; anything else becomes '_'. */
export function tagSafe(s: string): string {
  return s.replace(/[^A-Za-z0-9_+.\-/=!:&#]/g, '_');
}
