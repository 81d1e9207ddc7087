// Package placement decides how a workload is isolated on a node: as a
// container, in its own virtual machine, or not at all. It is berth's
// isolation policy engine.
//
// The package is pure. Decide is a function from a workload, a parsed policy
// and facts about the node to a Decision with its trace; nothing here reads
// files, the clock or the network, or logs. The agent converts its own types
// into Workload and NodeFacts, and the policy file's bytes into a Policy
// with Parse.
//
// # Semantics
//
// Every rule whose conditions all hold matches, and every match is reported.
// The strongest outcome among the matching rules wins: deny, then vm, then
// container. The policy default applies only when no rule matches; so a
// container rule is how a policy whose default is vm lets chosen workloads
// run as containers, and a policy whose default is deny becomes an
// allow-list.
//
// The submitter's isolation request may raise the outcome but never lower
// it: a vm request turns container into vm (the deciding rule is then
// "request"), a container request where the policy requires vm is refused,
// naming the rule that requires it, and auto (or no request) takes what the
// policy says. When the node has no working driver for the isolation
// required, the verdict is unschedulable with the driver's reason: berth
// never falls back to weaker isolation. A deny always wins, whatever was
// requested.
//
// # Policy files
//
//	apiVersion: berth.dev/v1
//	kind: IsolationPolicy
//	default: container          # container, vm or deny
//	rules:
//	  - name: untrusted-to-vm   # a DNS label, unique; "default" and "request" are reserved
//	    description: Untrusted workloads get their own kernel.
//	    match:
//	      labels: {trust: untrusted}
//	    isolation: vm           # container or vm; or instead: action: deny
//
// A rule has match conditions, a when expression, or both; all of them must
// hold. A rule with neither is an error, since it would match everything
// by accident; write when: "true" to match everything on purpose. The match
// conditions are (a mapping means all of it, a list means any of it):
//
//	labels: {k: v, ...}     every label k has value v
//	labels_exist: [k, ...]  at least one label k is set, whatever its value
//	tenants: [t, ...]       the "tenant" label is one of t
//	images: [glob, ...]     the normalized image reference matches a glob
//	privileged: true|false  the workload is (or is not) privileged
//	host_paths: true|false  the workload mounts (or does not mount) a host directory
//	cpu_gt: 4               requested cores > 4
//	memory_mb_gt: 8192      requested memory in MiB > 8192
//	pids_gt: 1024           requested pids limit > 1024
//
// Resource thresholds compare the requests as the agent passes them, after
// it has filled in defaults. Image globs match the whole normalized
// reference (docker.io/library/busybox:latest): * matches within a path
// segment, ** across segments, ? one character, [a-z] a class. A glob with
// no tag or digest matches every tag and digest of the repositories it
// matches, so docker.io/evil/app covers docker.io/evil/app:1.0.
//
// # CEL expressions
//
// when is a CEL expression (https://cel.dev, as in Kubernetes admission
// policies) that must be a bool. It sees two variables:
//
//	workload.name, .image, .tenant, .isolation (auto, container or vm)  string
//	workload.labels                                                     map(string, string)
//	workload.privileged                                                 bool
//	workload.host_paths                                                 list(string)
//	workload.resources.cpu                                              double
//	workload.resources.memory_mb, workload.resources.pids              int
//	node.vm_available, node.container_available                         bool
//	node.accel (kvm, tcg or "")                                         string
//	node.labels                                                         map(string, string)
//
// Expressions are type-checked when the policy is loaded, and numbers
// compare across int and double (cpu > 4 works). CEL's string extensions
// are available. An expression that fails at evaluation time, for example
// by indexing a missing label or exceeding its cost limit, counts as
// matched and the Decision says so: a broken rule errs towards isolation.
// So test for a label before reading it: "team" in workload.labels &&
// workload.labels.team == "ml".
//
// # Errors
//
// Parse reports every problem in a file at once, as an ErrorList of
// file:line:column: message lines. Unknown keys, wrong types, bad names,
// globs or outcomes, duplicate rule names, and CEL that does not compile or
// type-check are errors; so are YAML anchors and aliases, a second YAML
// document, and files over MaxSize.
package placement
