"""Code generation: the shared kernel representation (kir) and the CPU backend (LLVM). See codegen/README.md.

Public entry points (import the submodules; this package imports nothing heavy, so the runtime can load
artifacts without llvmlite):
  dzc.codegen.compile.compile_model(programs, weights, config, out_dir, cpu=, triple=, progress=)
  dzc.codegen.compile.lower_programs(programs, weights, target) -> (Module, SlotTable)
  dzc.codegen.runner.NativeProgram(program, weights).run(inputs)
  dzc.codegen.target.cpu_target(cpu=, triple=) / host_target()
"""
