//! The guest: a tiny 16-bit real-mode program, assembled by hand.
//!
//! The vCPU starts at [`CODE`] with every segment base 0, so an address in the code is a
//! GPA. The program talks to the VMM three ways, the way a confidential guest would:
//!
//! - `out` to [`DOORBELL`]: "device, please act on my shared buffer" (AL = request);
//! - `out` to [`REPORT`]: a result for the VMM to check (AL = value);
//! - the `KVM_HC_MAP_GPA_RANGE` hypercall: "make these pages private/shared"
//!   (EAX = 12, EBX = GPA, ECX = pages, EDX = attributes; KVM puts the VMM's answer in
//!   EAX and resumes after the instruction).
//!
//! Each helper below emits one instruction; its comment gives the encoding.

/// GPA of the first instruction.
pub const CODE: u64 = 0x1000;
/// GPA of the stack top (the program pushes nothing; set for hygiene).
pub const STACK: u64 = 0x3000;
/// Buffer A: filled by the guest, converted private and back.
pub const BUF_A: u64 = 0x4000;
/// Buffer B: the device copies A here.
pub const BUF_B: u64 = 0x5000;
/// The page the VMM stages device data in (the guest never touches it).
pub const STAGING: u64 = 0x6000;
/// A page in the memslot that has no guest_memfd (no private backing).
pub const WINDOW: u64 = 0x8000;

/// Port the guest writes a device request to.
pub const DOORBELL: u16 = 0x10;
/// Port the guest writes a result to.
pub const REPORT: u16 = 0x11;

/// Doorbell requests.
pub const REQ_COPY_A_TO_B: u8 = 1;
pub const REQ_WRITE_A_WHILE_PRIVATE: u8 = 2;
pub const REQ_WRITE_A_WHILE_SHARED: u8 = 3;

/// The byte the guest stores into A while A is private.
pub const PRIVATE_FILL: u8 = 0xee;
/// The byte the VMM has the device write into A.
pub const DEVICE_FILL: u8 = 0xc3;

/// `KVM_HC_MAP_GPA_RANGE` (include/uapi/linux/kvm_para.h).
pub const KVM_HC_MAP_GPA_RANGE: u64 = 12;
/// Attribute bit of `KVM_HC_MAP_GPA_RANGE`: 1 = encrypted (private), 0 = shared.
pub const KVM_MAP_GPA_RANGE_ENCRYPTED: u64 = 1 << 4;

/// Which instruction enters the hypervisor: AMD's `vmmcall` or Intel's `vmcall`. KVM
/// would patch the wrong one after a #UD, but a guest should use its CPU's own.
#[derive(Clone, Copy, Debug)]
pub enum HypercallInsn {
    Vmmcall,
    Vmcall,
}

impl HypercallInsn {
    /// The host's CPU vendor decides (the guest runs on the same CPU).
    pub fn for_this_cpu() -> Self {
        // SAFETY: CPUID leaf 0 exists on every x86_64 CPU. (`__cpuid` is a safe fn on
        // newer Rust, an unsafe one on the MSRV.)
        #[allow(unused_unsafe)]
        let r = unsafe { std::arch::x86_64::__cpuid(0) };
        let mut vendor = [0u8; 12];
        vendor[0..4].copy_from_slice(&r.ebx.to_le_bytes());
        vendor[4..8].copy_from_slice(&r.edx.to_le_bytes());
        vendor[8..12].copy_from_slice(&r.ecx.to_le_bytes());
        if &vendor == b"GenuineIntel" {
            HypercallInsn::Vmcall
        } else {
            HypercallInsn::Vmmcall
        }
    }
}

impl std::fmt::Display for HypercallInsn {
    fn fmt(&self, f: &mut std::fmt::Formatter<'_>) -> std::fmt::Result {
        f.write_str(match self {
            HypercallInsn::Vmmcall => "vmmcall (AMD)",
            HypercallInsn::Vmcall => "vmcall (Intel)",
        })
    }
}

/// Emits 16-bit code.
struct Asm(Vec<u8>);

impl Asm {
    fn emit(&mut self, bytes: &[u8]) {
        self.0.extend_from_slice(bytes);
    }
    /// Offset of the next instruction (a label).
    fn here(&self) -> usize {
        self.0.len()
    }
    /// `cld`: FC. String instructions walk upwards.
    fn cld(&mut self) {
        self.emit(&[0xfc]);
    }
    /// `mov di, imm16`: BF iw. DI = destination pointer of stos/scas/cmps.
    fn mov_di(&mut self, v: u16) {
        self.emit(&[0xbf]);
        self.emit(&v.to_le_bytes());
    }
    /// `mov si, imm16`: BE iw. SI = source pointer of cmps.
    fn mov_si(&mut self, v: u16) {
        self.emit(&[0xbe]);
        self.emit(&v.to_le_bytes());
    }
    /// `mov cx, imm16`: B9 iw. CX = count for `loop` and `rep`.
    fn mov_cx(&mut self, v: u16) {
        self.emit(&[0xb9]);
        self.emit(&v.to_le_bytes());
    }
    /// `mov al, imm8`: B0 ib.
    fn mov_al(&mut self, v: u8) {
        self.emit(&[0xb0, v]);
    }
    /// `xor ax, ax`: 31 C0. AX = 0.
    fn zero_ax(&mut self) {
        self.emit(&[0x31, 0xc0]);
    }
    /// `stosb`: AA. [ES:DI] = AL; DI += 1.
    fn stosb(&mut self) {
        self.emit(&[0xaa]);
    }
    /// `inc ax`: 40.
    fn inc_ax(&mut self) {
        self.emit(&[0x40]);
    }
    /// `loop rel8`: E2 cb. CX -= 1; jump to `target` while CX != 0.
    fn loop_to(&mut self, target: usize) {
        let rel = target as isize - (self.here() as isize + 2);
        self.emit(&[0xe2, i8::try_from(rel).expect("loop target too far") as u8]);
    }
    /// `rep stosb`: F3 AA. Stores AL into CX bytes at [ES:DI].
    fn rep_stosb(&mut self) {
        self.emit(&[0xf3, 0xaa]);
    }
    /// `repe scasb`: F3 AE. Compares AL with bytes at [ES:DI] while equal, at most CX.
    fn repe_scasb(&mut self) {
        self.emit(&[0xf3, 0xae]);
    }
    /// `repe cmpsb`: F3 A6. Compares [DS:SI] with [ES:DI] while equal, at most CX.
    fn repe_cmpsb(&mut self) {
        self.emit(&[0xf3, 0xa6]);
    }
    /// `setne al`: 0F 95 C0. AL = 1 if the last comparison found a difference, else 0.
    fn setne_al(&mut self) {
        self.emit(&[0x0f, 0x95, 0xc0]);
    }
    /// `out imm8, al`: E6 ib. Exits to the VMM (KVM_EXIT_IO, direction out).
    fn out(&mut self, port: u16) {
        self.emit(&[0xe6, u8::try_from(port).expect("port above 0xff")]);
    }
    /// `mov al, [moffs16]`: A0 iw. Reads one byte at DS:addr.
    fn load_al(&mut self, addr: u16) {
        self.emit(&[0xa0]);
        self.emit(&addr.to_le_bytes());
    }
    /// `mov e<reg>, imm32`: 66 B8+r id (the 66 prefix selects 32-bit operands in
    /// real mode). r: 0 = EAX, 1 = ECX, 2 = EDX, 3 = EBX.
    fn mov_r32(&mut self, reg: u8, v: u32) {
        self.emit(&[0x66, 0xb8 + reg]);
        self.emit(&v.to_le_bytes());
    }
    /// `hlt`: F4. Exits to the VMM (KVM_EXIT_HLT: no interrupt controller in KVM here).
    fn hlt(&mut self) {
        self.emit(&[0xf4]);
    }

    /// `KVM_HC_MAP_GPA_RANGE(gpa, pages, attrs)`, then reports EAX's low byte (the VMM's
    /// return value; 0 = done). In real mode KVM reads the 32-bit registers.
    fn map_gpa_range(&mut self, insn: HypercallInsn, gpa: u16, pages: u32, private: bool) {
        self.mov_r32(0, KVM_HC_MAP_GPA_RANGE as u32); // EAX = hypercall number
        self.mov_r32(3, u32::from(gpa)); // EBX = first GPA (4 KiB aligned)
        self.mov_r32(1, pages); // ECX = number of 4 KiB pages
        let attrs = if private {
            KVM_MAP_GPA_RANGE_ENCRYPTED
        } else {
            0
        };
        self.mov_r32(2, attrs as u32); // EDX = attributes (bit 4: private)
        match insn {
            HypercallInsn::Vmmcall => self.emit(&[0x0f, 0x01, 0xd9]), // vmmcall
            HypercallInsn::Vmcall => self.emit(&[0x0f, 0x01, 0xc1]),  // vmcall
        }
        self.out(REPORT); // report AL = low byte of the return value
    }

    /// Checks that the 4 KiB page at `page` holds `byte` everywhere; reports AL = 0 if so.
    fn check_page(&mut self, page: u16, byte: u8) {
        self.mov_di(page);
        self.mov_cx(0x1000);
        self.mov_al(byte);
        self.repe_scasb();
        self.setne_al();
        self.out(REPORT);
    }
}

/// The whole program. Steps (the VMM's script in main.rs expects exactly these exits):
///
/// 1. fill A with 0, 1, 2, … (byte i = i mod 256); doorbell 1 (device copies A to B);
/// 2. compare A with B, report 0 if equal;
/// 3. hypercall: A private; report the return value;
/// 4. fill A with [`PRIVATE_FILL`] (lands in guest_memfd); doorbell 2 (device tries to
///    write A); check A still holds the fill, report;
/// 5. hypercall: A shared; report;
/// 6. doorbell 3 (device writes [`DEVICE_FILL`] into A); check A, report;
/// 7. hypercall: the window page private; report; read one byte of it (KVM cannot back a
///    private access there: KVM_EXIT_MEMORY_FAULT) and report the byte read;
/// 8. `hlt`.
pub fn program(insn: HypercallInsn) -> Vec<u8> {
    let mut a = Asm(Vec::new());
    let (buf_a, buf_b, window) = (BUF_A as u16, BUF_B as u16, WINDOW as u16);
    // 1.
    a.cld();
    a.mov_di(buf_a);
    a.mov_cx(0x1000);
    a.zero_ax();
    let fill = a.here();
    a.stosb(); // [DI++] = AL
    a.inc_ax(); // next byte value (wraps mod 256 in AL)
    a.loop_to(fill);
    a.mov_al(REQ_COPY_A_TO_B);
    a.out(DOORBELL);
    // 2.
    a.mov_si(buf_a);
    a.mov_di(buf_b);
    a.mov_cx(0x1000);
    a.repe_cmpsb();
    a.setne_al();
    a.out(REPORT);
    // 3.
    a.map_gpa_range(insn, buf_a, 1, true);
    // 4.
    a.mov_di(buf_a);
    a.mov_cx(0x1000);
    a.mov_al(PRIVATE_FILL);
    a.rep_stosb();
    a.mov_al(REQ_WRITE_A_WHILE_PRIVATE);
    a.out(DOORBELL);
    a.check_page(buf_a, PRIVATE_FILL);
    // 5.
    a.map_gpa_range(insn, buf_a, 1, false);
    // 6.
    a.mov_al(REQ_WRITE_A_WHILE_SHARED);
    a.out(DOORBELL);
    a.check_page(buf_a, DEVICE_FILL);
    // 7.
    a.map_gpa_range(insn, window, 1, true);
    a.load_al(window);
    a.out(REPORT);
    // 8.
    a.hlt();
    a.0
}
