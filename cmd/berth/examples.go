package main

import (
	"github.com/spf13/cobra"
)

// examples are what `berth CMD --help` shows under Examples, by command
// path, for the commands that do not set Example where they are defined.
// TestEveryCommandHasExamples fails for a command that has neither.
var examples = map[string]string{
	"berth": `  berth run --wait busybox:latest -- echo hello
  berth ps
  berth --addr unix:///run/berth/berth.sock node status
  BERTH_ADDR=node-1:7470 BERTH_TOKEN=$(cat reader.token) berth -o json node status`,
	"berth agent": `  berth agent --config /etc/berth/berth.yaml
  berth agent --listen 127.0.0.1:7470 --data-dir /var/lib/berth --log-level debug`,
	"berth ps": `  berth ps
  berth ps -a --isolation vm
  berth ps -l app=web --state running
  berth ps -q | xargs berth stop        # ids only, one a line`,
	"berth inspect": `  berth inspect web
  berth inspect -o json 1f0c2a9e | jq .placement`,
	"berth logs": `  berth logs web
  berth logs -f -n 100 web
  berth logs --stream stderr 1f0c2a9e`,
	"berth stop": `  berth stop web
  berth stop -t 30s web worker
  berth stop --no-wait $(berth ps -q -l app=batch)`,
	"berth rm": `  berth rm web
  berth rm -f web                       # stop it first if it runs
  berth ps -a -q --state exited | xargs berth rm`,
	"berth stats": `  berth stats web
  berth stats -o json web`,
	"berth image": `  berth image pull docker.io/library/alpine:3.20
  berth image import busybox.tar
  berth image ls`,
	"berth image import": `  berth image import busybox.tar
  berth image import --ref example.com/tools/debian:12 rootfs.tar
  berth image import --ref appliance:1 disk.qcow2   # a whole-disk VM image
  docker save alpine:3.20 | berth image import -`,
	"berth image pull": `  berth image pull busybox:latest
  berth image pull 127.0.0.1:5000/team/app:1.4
  echo "$REGISTRY_TOKEN" | berth image pull -u ci --password-stdin registry.example.com/team/app:2`,
	"berth image prune": `  berth image prune         # least recently used first, down to the low watermark
  berth image prune --all   # every image no workload uses`,
	"berth image ls": `  berth image ls
  berth image ls -o json`,
	"berth image rm": `  berth image rm busybox:latest
  berth image rm example.com/tools/debian:12 busybox:latest`,
	"berth node": `  berth node status
  berth node drain --reason "kernel upgrade"`,
	"berth node status": `  berth node status
  berth -o json node status | jq .allocated
  berth node status --index 42 --wait 5m   # wait for the next change`,
	"berth node cordon": `  berth node cordon --reason "disk replacement at 14:00"`,
	"berth node drain": `  berth node drain --reason "kernel upgrade" --timeout 30s
  berth node drain --wait=false`,
	"berth node uncordon": `  berth node uncordon`,
	"berth events": `  berth events
  berth events --workload web --type workload.
  berth events --since 120 -o json`,
	"berth policy": `  berth policy check /etc/berth/policy.yaml
  berth policy show
  berth policy explain -f job.json`,
	"berth policy show": `  berth policy show
  berth -o json policy show`,
	"berth volume": `  berth volume create --size 10G pgdata
  berth run -v pgdata:/var/lib/postgresql/data postgres:16
  berth volume ls`,
	"berth volume create": `  berth volume create cache                 # a directory
  berth volume create --size 10G pgdata     # a filesystem of its own, full at 10 GiB
  berth volume create -l tenant=team-a --size 512M team-a-scratch`,
	"berth volume ls": `  berth volume ls
  berth volume ls -o json`,
	"berth volume inspect": `  berth volume inspect pgdata`,
	"berth volume rm":      `  berth volume rm cache pgdata`,
	"berth token":          `  berth token add --file /etc/berth/tokens --role reader --name prometheus`,
	"berth token add": `  berth token add --file /etc/berth/tokens --role admin
  berth token add --file /etc/berth/tokens --role submitter --tenant team-a --name ci-team-a
  berth token add --file /etc/berth/tokens --role reader --name prometheus > reader.token`,
}

// addExamples sets each command's Example from examples where it has none.
func addExamples(c *cobra.Command) {
	if c.Example == "" {
		c.Example = examples[c.CommandPath()]
	}
	for _, sub := range c.Commands() {
		addExamples(sub)
	}
}
